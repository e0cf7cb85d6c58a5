"""Training robustness: kill -9 during a checkpoint save, NaN loss, corrupt checkpoints, DataLoader worker crashes."""

from __future__ import annotations

import contextlib
import gc
import glob
import multiprocessing.resource_sharer
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from helpers import ROOT as _ROOT
from PIL import Image
from test_training_loop import TinySeg, _cfg, _train_set
from torch import nn

import train as train_script
from training import checkpoint as ckpt_io
from training import datasets, loop
from training.transforms import TrainTransform

ROOT = str(_ROOT)
CPU = torch.device("cpu")

# ---- kill -9 while a checkpoint is being written -----------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, torch
    from training.checkpoint import atomic_save
    path = sys.argv[1]
    state = {"model": {"w": torch.arange(12_000_000, dtype=torch.float32)}, "iteration": 0}  # 48 MB
    while True:
        state["iteration"] += 1
        atomic_save(state, path)
        print(state["iteration"], flush=True)
""")


def _temps(folder: str) -> list[str]:
    return glob.glob(os.path.join(folder, ".last.pt.*.tmp"))


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = str(tmp_path / "last.pt")
    for _attempt in range(3):  # the kill must land inside a write; retry in the rare case it lands between two
        proc = subprocess.Popen([sys.executable, "-c", WRITER, path], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": ROOT})
        try:
            assert proc.stdout.readline().strip() == "1", "the writer did not finish its first save"
            deadline = time.time() + 20
            while not _temps(str(tmp_path)) and time.time() < deadline:
                time.sleep(0.001)
            time.sleep(0.01)  # well inside torch.save / fsync of 48 MB
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        if _temps(str(tmp_path)):  # a half-written temp file is left: the kill interrupted a save
            break
    else:
        pytest.fail("three SIGKILLs all landed between saves")
    ckpt = ckpt_io.load_checkpoint(path)
    assert ckpt["iteration"] >= 1
    assert torch.equal(ckpt["model"]["w"], torch.arange(12_000_000, dtype=torch.float32))
    # The next save removes the dead writer's temp file.
    ckpt_io.atomic_save({"model": {}, "iteration": 0}, path)
    assert _temps(str(tmp_path)) == []


def test_stale_temp_of_a_live_process_is_kept(tmp_path):
    path = str(tmp_path / "last.pt")
    mine = tmp_path / f".last.pt.{os.getpid()}.abc.tmp"  # our own pid: possibly a save in progress in a thread
    other = tmp_path / f".last.pt.{os.getppid()}.abc.tmp"  # a live process
    mine.write_bytes(b"x")
    other.write_bytes(b"x")
    ckpt_io.atomic_save({"model": {}}, path)
    assert mine.exists() and other.exists()


# ---- NaN loss -------------------------------------------------------------------------------------------------


class NaNAt(nn.Module):
    """Wraps a model; its `at`-th training forward returns NaN logits."""

    def __init__(self, inner: nn.Module, at: int) -> None:
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                return {"out": out["out"] * float("nan")}
        return out


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = NaNAt(TinySeg(), at=4)
    out_dir = str(tmp_path / "run")
    with pytest.raises(FloatingPointError) as info:
        loop.fit(model, _train_set(), _cfg(out_dir=out_dir, checkpoint_every=1, iterations=8), CPU)
    last = os.path.join(out_dir, "last.pt")
    message = str(info.value)
    assert "loss is nan at iteration 4" in message
    assert f"Checkpoints: {last} (iteration 3). {last} holds the weights this forward ran" in message
    assert "good" not in message
    ckpt = ckpt_io.load_checkpoint(last)
    assert ckpt["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    # The NaN step did not reach the optimizer: the weights in memory are the checkpoint's.
    for k, v in model.named_parameters():
        assert torch.equal(v, ckpt["model"][k]), k


def test_nan_loss_without_any_checkpoint_says_so():
    with pytest.raises(FloatingPointError, match=r"loss is nan at iteration 1: .*No checkpoint was written"):
        loop.fit(NaNAt(TinySeg(), at=1), _train_set(), _cfg(iterations=2), CPU)


def test_train_script_nan_loss_keeps_last_pt(tmp_path, monkeypatch):
    """train.py end to end: a NaN at step 3 of 4 leaves last.pt (saved every step) at iteration 2, loadable and
    resumable."""
    monkeypatch.setattr(train_script, "build_model", lambda *a, **k: NaNAt(TinySeg(a[1]), at=3))
    out_dir = str(tmp_path / "run")
    args = ["--crop-size", "32", "--synthetic-train-size", "16", "--synthetic-val-size", "2", "--batch-size", "2",
            "--iterations", "4", "--checkpoint-every", "1", "--no-tensorboard", "--device", "cpu",
            "--out-dir", out_dir]
    with pytest.raises(SystemExit, match=r"^train.py: loss is nan at iteration 3: .*Checkpoints: "
                                         r".*last\.pt \(iteration 2\)") as info:
        train_script.main(args)
    assert "\n" not in str(info.value)  # one line, no traceback
    ckpt = ckpt_io.load_checkpoint(os.path.join(out_dir, "last.pt"))
    assert ckpt["iteration"] == 2
    ckpt_io.check_resumable(ckpt)


# ---- corrupt checkpoints --------------------------------------------------------------------------------------


@pytest.fixture
def good_checkpoint(tmp_path):
    path = str(tmp_path / "good.pt")
    ckpt_io.atomic_save({"model": {"w": torch.randn(1000)}, "optimizer": {}, "scheduler": {}, "iteration": 1,
                         "rng": ckpt_io.capture_rng_state()}, path)
    return path


@pytest.mark.parametrize("damage, pattern", [
    ("empty", r"cannot read checkpoint .*bad\.pt: the file is empty"),
    ("truncated", r"cannot read checkpoint .*bad\.pt \(\d+ bytes\): it is corrupt or truncated"),
    ("garbage", r"cannot read checkpoint .*bad\.pt \(\d+ bytes\): it is corrupt or truncated"),
    ("flipped", r"cannot read checkpoint .*bad\.pt"),
])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, good_checkpoint, damage, pattern):
    data = open(good_checkpoint, "rb").read()
    bad = tmp_path / "bad.pt"
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    else:  # the zip's central directory damaged
        bad.write_bytes(data[:-200] + bytes(b ^ 0xFF for b in data[-200:]))
    with pytest.raises(RuntimeError, match=pattern):
        ckpt_io.load_checkpoint(str(bad))


def test_checkpoint_that_is_not_a_train_checkpoint(tmp_path):
    path = str(tmp_path / "weights.pt")
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match=r"weights\.pt is not a train\.py checkpoint"):
        ckpt_io.load_checkpoint(path)
    ckpt_io.atomic_save({"model": TinySeg().state_dict()}, path)
    with pytest.raises(ValueError, match=r"cannot resume from .*weights\.pt: it has no 'optimizer', 'scheduler', "
                                         r"'iteration', 'rng' entries"):
        ckpt_io.check_resumable(ckpt_io.load_checkpoint(path), path)
    with pytest.raises(ValueError, match=r"cannot resume from the checkpoint: it has no 'optimizer'"):
        loop.fit(TinySeg(), _train_set(), _cfg(), CPU, resume=ckpt_io.load_checkpoint(path))


def test_train_script_resume_from_a_corrupt_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(train_script, "build_model", lambda *a, **k: TinySeg(a[1]))
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "last.pt").write_bytes(b"PK\x03\x04 not really a zip")
    common = ["--out-dir", str(out_dir), "--device", "cpu", "--iterations", "1", "--crop-size", "32",
              "--synthetic-train-size", "4", "--synthetic-val-size", "2", "--no-tensorboard", "--batch-size", "2"]
    # a one-line exit naming the flag and the file, not a traceback
    with pytest.raises(SystemExit, match=r"^--resume .*last\.pt: cannot read checkpoint .*last\.pt .*corrupt or "
                                         r"truncated"):
        train_script.main(["--resume", *common])
    with pytest.raises(SystemExit, match=r"^--resume .*run: this is a folder; give a checkpoint file in it"):
        train_script.main(["--resume", str(out_dir), *common])


# ---- DataLoader worker crash -------------------------------------------------------------------------------------


def _folder_dataset(root, names):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\nthing\n")
    rng = np.random.default_rng(0)
    for n in names:
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / "images" / f"{n}.png")
        Image.fromarray(rng.integers(0, 2, (24, 24), dtype=np.uint8), mode="L").save(root / "masks" / f"{n}.png")
    (root / "train.txt").write_text("\n".join(names) + "\n")
    (root / "val.txt").write_text("\n".join(names) + "\n")
    return datasets.FolderSegmentation(str(root), "train")


def _die_on(bad: str):
    real = datasets.read_image

    def read_image(path, **kwargs):
        if os.path.basename(path) == bad:
            os.kill(os.getpid(), signal.SIGKILL)  # a decoder segfault or the OOM killer: no Python exception
        return real(path, **kwargs)

    return read_image


def _loader_iterators() -> list:
    """The live multiprocessing DataLoader iterators of this process (by type: isinstance on a dead weak proxy among
    gc's objects raises ReferenceError)."""
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    return [o for o in gc.get_objects() if issubclass(type(o), _MultiProcessingDataLoaderIter)]


def test_worker_crash_names_the_file_it_was_reading(tmp_path, monkeypatch):
    names = [f"img{i}" for i in range(6)]
    ds = _folder_dataset(tmp_path / "data", names)
    monkeypatch.setattr(datasets, "read_image", _die_on("img3.png"))  # the workers are forked: they see it
    train_set = loop.AugmentedDataset(ds, TrainTransform(24, scale_range=(1.0, 1.0), flip=False))
    with pytest.raises(datasets.WorkerCrashError, match=r"DataLoader worker .*It was reading: .*img3\.png "
                                                        r"\(mask .*img3\.png\) \(worker pid \d+\)") as info:
        loop.fit(TinySeg(2), train_set, _cfg(batch_size=2, iterations=6, num_workers=2), CPU)
    # The loader's iterator is shut down by fit itself, not when the traceback (kept here by `info`) is freed: until
    # then its crashed worker's pid stayed on DataLoader's SIGCHLD handler, which raised "DataLoader worker ... is
    # killed" later in whatever the main thread ran (a CI run: pytest's own reporting, an INTERNALERROR).
    assert info.value is not None  # (the traceback, whose frames hold the iterator, still alive)
    assert all(it._shutdown for it in _loader_iterators())


def test_a_crash_seen_as_the_transports_error_still_names_the_file(tmp_path, monkeypatch):
    # A worker dying while this process unpickles a batch it sent: its socket closes before it is a zombie, so the
    # fetch fails with ConnectionRefusedError while DataLoader still sees the worker alive (no "exited unexpectedly"),
    # and its SIGCHLD came later, during the loader's shutdown: a CI run got a bare "DataLoader worker (pid ...) is
    # killed by signal" from there (or, had the shutdown's join reaped it first, the bare ConnectionRefusedError).
    # Made certain here: the parent fetching a batch (worker 1's) says so, worker 0 (in its first read) then announces
    # its death and dies 0.3 s later, and the fetch fails as the transport would once the announcement is seen.
    real, fetching, dying = datasets.read_image, tmp_path / "fetching", tmp_path / "dying"

    def wait_for(path):
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    def read_image(path, **kwargs):
        info = torch.utils.data.get_worker_info()
        if info is not None and info.id == 0:
            wait_for(fetching)
            dying.write_text(str(os.getpid()))
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, **kwargs)

    def detach(self):  # the parent's end of a shared batch tensor's file descriptor
        fetching.touch()
        wait_for(dying)
        raise ConnectionRefusedError(111, "Connection refused")

    ds = _folder_dataset(tmp_path / "data", [f"img{i}" for i in range(6)])
    monkeypatch.setattr(datasets, "read_image", read_image)
    monkeypatch.setattr(multiprocessing.resource_sharer.DupFd, "detach", detach)
    train_set = loop.AugmentedDataset(ds, TrainTransform(24, scale_range=(1.0, 1.0), flip=False))
    with pytest.raises(datasets.WorkerCrashError,
                       match=r"DataLoader worker \(pid (\d+) was killed by signal 9 \(SIGKILL\)\) while the loader was "
                             r"running \(ConnectionRefusedError: .*\)\. It was reading: .*img\d\.png \(mask .*\) "
                             r"\(worker pid \1\)$") as info:
        loop.fit(TinySeg(2), train_set, _cfg(batch_size=2, iterations=6, num_workers=2), CPU)
    assert str(info.value).startswith(f"DataLoader worker (pid {dying.read_text()} ")
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert all(it._shutdown for it in _loader_iterators())
    time.sleep(0.3)  # nor a late report from DataLoader's SIGCHLD handler (it would be raised here)


def test_shut_down_names_the_workers_that_died_on_their_own(tmp_path, monkeypatch):
    ds = _folder_dataset(tmp_path / "data", ["a", "b", "c", "d"])
    monkeypatch.setattr(datasets, "read_image", _die_on("a.png"))
    reads = datasets.ReadTracker(loop.AugmentedDataset(ds, None), 2)
    batches = iter(torch.utils.data.DataLoader(reads.dataset, batch_size=1, num_workers=2))
    deadline = time.monotonic() + 30
    with contextlib.suppress(RuntimeError):  # DataLoader's SIGCHLD handler may report the death while we wait
        while batches._workers[0].is_alive() and time.monotonic() < deadline:  # worker 0 reads a.png
            time.sleep(0.01)
    crashed = datasets.shut_down(batches)  # worker 1 stopped by the shutdown: not listed
    assert crashed == [(batches._workers[0].pid, -signal.SIGKILL)]
    assert datasets.shut_down(batches) == crashed and batches._shutdown  # idempotent
    assert datasets.shut_down(None) == [] and datasets.shut_down(iter([1])) == []
    mine, theirs = multiprocessing.Pipe()
    theirs.close()
    with pytest.raises(EOFError) as eof:  # an EOFError raised inside multiprocessing, as a dead worker's pipe gives
        mine.recv()
    mine.close()
    explained = reads.explain(eof.value, crashed)
    assert isinstance(explained, datasets.WorkerCrashError)
    assert str(explained).startswith(f"DataLoader worker (pid {crashed[0][0]} was killed by signal 9 (SIGKILL)) while "
                                     "the loader was running (EOFError: ). It was reading: ")
    assert "a.png" in str(explained)
    assert reads.explain(eof.value, []) is None  # no worker crashed
    try:  # the same kind of error raised outside the loader (a checkpoint's write, say) is not the crash's
        raise EOFError("not the loader's")
    except EOFError as e:
        assert reads.explain(e, crashed) is None
    assert reads.explain(ValueError("not a loader's kind of error"), crashed) is None
    # a crash DataLoader reports of another loader's worker (the training loader's, during an evaluation) is left
    # to that loader's tracker
    other = RuntimeError(f"DataLoader worker (pid {crashed[0][0] + 100000}) is killed by signal: Killed.")
    assert reads.explain(other, (), workers=[w.pid for w in batches._workers]) is None
    assert isinstance(reads.explain(other, ()), datasets.WorkerCrashError)  # workers unknown: reported here


def test_shut_down_takes_the_handlers_report_of_its_own_workers_only():
    # DataLoader keeps the pids on its SIGCHLD handler until its shutdown ends (a worker killed mid-shutdown must not
    # hang it), so the handler can raise from inside the shutdown: for one of the iterator's workers that is the crash
    # the exit codes report; for another loader's worker it goes on, for that loader's report.
    from types import SimpleNamespace

    class Iterator:
        def __init__(self, message):
            self._workers = [SimpleNamespace(pid=101, exitcode=-signal.SIGKILL), SimpleNamespace(pid=102, exitcode=0),
                             SimpleNamespace(pid=103, exitcode=-signal.SIGTERM)]  # 103: stopped by the shutdown
            self.message = message

        def _shutdown_workers(self):
            raise RuntimeError(self.message)

    assert datasets.shut_down(Iterator("DataLoader worker (pid 101) is killed by signal: Killed. ")) == [
        (101, -signal.SIGKILL)]
    with pytest.raises(RuntimeError, match=r"pid 999\)"):
        datasets.shut_down(Iterator("DataLoader worker (pid 999) is killed by signal: Killed. "))
    with pytest.raises(RuntimeError, match="something else"):
        datasets.shut_down(Iterator("something else"))


def test_eval_worker_crash_names_the_file(tmp_path, monkeypatch):
    ds = _folder_dataset(tmp_path / "data", ["a", "b", "c"])
    monkeypatch.setattr(datasets, "read_image", _die_on("b.png"))
    with pytest.raises(datasets.WorkerCrashError, match=r"It was reading: .*b\.png") as info:
        loop.evaluate(TinySeg(2), train_script._Normalized(ds), 2, ["background", "thing"], CPU, num_workers=1,
                      progress=False)
    assert info.value is not None  # shut down by evaluate, as by fit
    assert all(it._shutdown for it in _loader_iterators())


def test_worker_python_error_keeps_its_own_message(tmp_path):
    ds = _folder_dataset(tmp_path / "data", ["a", "b"])
    (tmp_path / "data" / "images" / "b.png").write_bytes(b"not a png")
    train_set = loop.AugmentedDataset(ds, TrainTransform(24, scale_range=(1.0, 1.0), flip=False))
    with pytest.raises(RuntimeError, match=r"cannot read image .*b\.png") as info:
        loop.fit(TinySeg(2), train_set, _cfg(batch_size=2, iterations=2, num_workers=1), CPU)
    assert not isinstance(info.value, datasets.WorkerCrashError)


def test_describe_source_sees_through_wrappers(tmp_path):
    ds = _folder_dataset(tmp_path / "data", ["a", "b"])
    wrapped = torch.utils.data.Subset(loop.AugmentedDataset(ds, None), [1, 0])
    assert datasets.describe_source(wrapped, 0).endswith("b.png (mask " + str(tmp_path / "data" / "masks" / "b.png")
                                                         + ")")
    assert "synthetic image 5" in datasets.describe_source(datasets.SyntheticShapes("train", 16, 10), 5)
    assert datasets.describe_source([1, 2], 1) == "sample 1 of list"


@pytest.mark.parametrize("op", ["onednn_unsafe_plan", "nchw_weight_grad_plan"])
@pytest.mark.parametrize("lists", [([1], [1], [1]), ([], [], []), ([1, 1], [1], [1, 1])])
def test_plan_ops_called_directly_refuse_short_geometry_lists(op, lists):
    # Their int[2] arguments were indexed at [0] and [1] unchecked: a heap over-read, or a null-pointer crash for
    # empty lists (found with AddressSanitizer).
    with pytest.raises(RuntimeError, match="must have 2 values each"):
        getattr(torch.ops.deeplab_ops, op)(torch.empty(1, 4, 5, 5), torch.empty(4, 4, 3, 3), *lists)


def test_the_largest_dilation_runs_an_nchw_layer_as_eager_does():
    # oneDNN's channels_last convolution dies of SIGFPE at a dilation of 2**31 - 1, where eager's NCHW call computes:
    # the cpu backend took such an NCHW layer's input gradient (and forward) through channels_last and crashed.
    code = (
        "import torch, deeplab_ops\n"
        "L = 2**31 - 1\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(2, 32, 9, 9, requires_grad=True)\n"
        "w = torch.randn(32, 32, 3, 3, requires_grad=True)\n"
        "out = deeplab_ops.conv_bn_relu(x, w, None, None, None, None, padding=L, dilation=L, backend='cpu')\n"
        "out.sum().backward()\n"
        "ref = deeplab_ops.conv_bn_relu(x.detach().requires_grad_(), w, None, None, None, None, padding=L, dilation=L,"
        " backend='reference')\n"
        "print('ok', float((out - ref).abs().max()) < 1e-3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok True", (proc.returncode, proc.stdout,
                                                                       proc.stderr[-2000:])

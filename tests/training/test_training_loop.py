"""The training loop: resume equality, fused vs eager loss curves, batch-size-1 error, frozen BN, checkpoints,
and train.py end to end (train → resume → eval-only → predict) with a tiny network standing in for DeepLabV3."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import train as train_script
from deeplab_ops.nn import FusedConvBNReLU
from training import checkpoint as ckpt_io
from training import loop
from training.datasets import SyntheticShapes
from training.transforms import TrainTransform

CPU = torch.device("cpu")


def _cbr(cin, cout, k, stride=1, padding=0, dilation=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, dilation, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class TinySeg(nn.Module):
    """DeepLabV3 in miniature: strided stem, a dilated conv, ASPP with an image-pooling branch, projection."""

    def __init__(self, num_classes: int = 21, fused: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        block = FusedConvBNReLU if fused else _cbr
        self.stem = block(3, 8, 3, stride=2, padding=1)
        self.body = block(8, 16, 3, stride=2, padding=2, dilation=2)
        self.aspp1 = block(16, 16, 1)
        self.aspp2 = block(16, 16, 3, padding=2, dilation=2)
        self.pool = block(16, 16, 1)
        self.project = block(48, 16, 1)
        self.drop = nn.Dropout(dropout)
        self.cls = nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        h = self.body(self.stem(x))
        p = self.pool(F.adaptive_avg_pool2d(h, 1)).expand(-1, -1, *h.shape[-2:])
        y = self.project(torch.cat([self.aspp1(h), self.aspp2(h), p], 1))
        return {"out": F.interpolate(self.cls(self.drop(y)), size=x.shape[-2:], mode="bilinear", align_corners=False)}


def _train_set(size=32, length=64):
    return loop.AugmentedDataset(SyntheticShapes("train", size, length, seed=1),
                                 TrainTransform(size, scale_range=(0.75, 1.5), flip=True))


def _cfg(**kw):
    base = dict(iterations=6, batch_size=4, lr=0.02, seed=7, progress=False, log_every=1)
    return loop.TrainConfig(**(base | kw))


def test_poly_schedule():
    f = loop.poly_lambda(100, 0.9)
    assert f(0) == 1.0 and f(100) == 0.0 and f(50) == pytest.approx(0.5 ** 0.9)


def test_resume_gives_the_same_losses(tmp_path):
    torch.manual_seed(0)
    ref_model = TinySeg(dropout=0.2)  # dropout: the RNG state must be restored too
    init = {k: v.clone() for k, v in ref_model.state_dict().items()}
    ref = loop.fit(ref_model, _train_set(), _cfg(out_dir=str(tmp_path / "a")), torch.device("cpu"))

    torch.manual_seed(0)
    model = TinySeg(dropout=0.2)
    model.load_state_dict(init)
    first = loop.fit(model, _train_set(), _cfg(out_dir=str(tmp_path / "b"), stop_after=3), torch.device("cpu"))
    assert first.iteration == 3
    torch.manual_seed(123)  # a different process state: everything must come from the checkpoint
    resumed_model = TinySeg(dropout=0.2)
    state = ckpt_io.load_checkpoint(str(tmp_path / "b" / "last.pt"))
    second = loop.fit(resumed_model, _train_set(), _cfg(out_dir=str(tmp_path / "b")), torch.device("cpu"),
                      resume=state)
    assert [i for i, _ in second.losses] == [4, 5, 6]
    assert first.losses + second.losses == ref.losses  # bitwise on CPU
    for k, v in ref_model.state_dict().items():
        assert torch.equal(v, resumed_model.state_dict()[k]), k


def test_an_error_in_the_final_evaluation_keeps_the_trained_checkpoint(tmp_path):
    def val_fn(model):
        raise ValueError("bad validation mask")

    model = TinySeg()
    with pytest.raises(ValueError, match="bad validation mask"):
        loop.fit(model, _train_set(), _cfg(out_dir=str(tmp_path)), torch.device("cpu"), val_fn=val_fn)
    state = ckpt_io.load_checkpoint(str(tmp_path / "last.pt"))
    assert state["iteration"] == 6
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())


def test_fused_and_eager_training_match_for_20_iterations():
    torch.manual_seed(0)
    eager = TinySeg(fused=False)
    fused = TinySeg(fused=True)
    fused.load_state_dict(eager.state_dict())  # identical state_dict keys
    cfg = _cfg(iterations=20, lr=0.05)
    a = loop.fit(eager, _train_set(), cfg, torch.device("cpu"))
    b = loop.fit(fused, _train_set(), cfg, torch.device("cpu"))
    la, lb = np.array([v for _, v in a.losses]), np.array([v for _, v in b.losses])
    assert la[-1] < la[0]  # it learns
    # Tolerance: float32 with a different summation order in BN statistics and conv algorithms, compounded over
    # 20 SGD steps: relative 1e-4 per loss value.
    np.testing.assert_allclose(lb, la, rtol=1e-4, atol=0)
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[k], v, rtol=1e-3, atol=1e-4, msg=k)


class _Float64(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.double()

    def forward(self, x, upsample=True):
        return self.net(x.double(), upsample=upsample)


def test_fused_deeplabv3_with_the_fused_loss_matches_eager():
    # train.py --fused-ops: model/'s DeepLabV3 fused, logits left at 1/16 resolution and
    # upsampled inside deeplab_ops.upsample_cross_entropy; against the eager model with F.interpolate +
    # F.cross_entropy. In float64: at 32x32 crops the features are 2x2 and BatchNorm over so few values makes
    # training chaotic (float32 rounding, 1e-7, grows to 1e-3 in the loss by the third step on either path),
    # while float64 paths agree to ~1e-11 after 5 steps. Tolerance: relative 1e-8 per loss value and on each
    # state tensor (L2). (memory_efficient=True models: tests/test_memory_efficient.py.)
    from model import deeplabv3_resnet

    torch.manual_seed(0)
    eager = _Float64(deeplabv3_resnet(29, num_classes=21))
    fused = _Float64(deeplabv3_resnet(29, num_classes=21, fused=True))
    fused.load_state_dict(eager.state_dict())
    cfg = _cfg(iterations=3, lr=0.01)
    a = loop.fit(eager, _train_set(), cfg, torch.device("cpu"))
    b = loop.fit(fused, _train_set(), dataclasses.replace(cfg, fused_loss=True), torch.device("cpu"))
    la, lb = np.array([v for _, v in a.losses]), np.array([v for _, v in b.losses])
    np.testing.assert_allclose(lb, la, rtol=1e-8, atol=0)
    for k, v in eager.state_dict().items():
        err = ((fused.state_dict()[k] - v).double().norm() / v.double().norm().clamp_min(1e-30)).item()
        assert err <= 1e-8, f"{k}: relative L2 difference {err:.3g} after 3 steps"


def test_batch_size_1_gives_the_aspp_error():
    with pytest.raises(ValueError, match="batch size 1.*image-pooling.*--freeze-bn"):
        loop.fit(TinySeg(), _train_set(), _cfg(batch_size=1), torch.device("cpu"))


def test_freeze_bn_keeps_statistics_and_allows_batch_1():
    for fused in (False, True):
        model = TinySeg(fused=fused)
        before = {k: v.clone() for k, v in model.state_dict().items() if ".1." in k or k.endswith((".1.weight",))}
        loop.fit(model, _train_set(), _cfg(batch_size=1, iterations=2, freeze_bn=True), torch.device("cpu"))
        for k, v in before.items():
            assert torch.equal(model.state_dict()[k], v), (fused, k)
        assert not model.stem[1].training and model.cls.training


def test_a_saved_checkpoint_gets_the_mode_of_any_new_file(tmp_path):
    """atomic_save writes a temp file (mkstemp: mode 0600) and renames it: the checkpoint gets the umask's mode, as
    metrics.json does, not 0600 (others in a shared folder could not read it)."""
    mask = os.umask(0o022)
    try:
        ckpt_io.atomic_save({"w": torch.ones(1)}, str(tmp_path / "c.pt"))
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(mask)
    assert (os.stat(tmp_path / "c.pt").st_mode & 0o777) == (os.stat(tmp_path / "plain.txt").st_mode & 0o777)


def test_atomic_save_leaves_old_file_on_failure(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    ckpt_io.atomic_save({"model": {"w": torch.ones(2)}}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ckpt_io.atomic_save({"model": Unpicklable()}, path)
    assert torch.equal(ckpt_io.load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="bad.pt"):
        ckpt_io.load_checkpoint(str(tmp_path / "bad.pt"))


def test_atomic_write_names_the_file_a_full_disk_stopped_and_reports_the_write_error(tmp_path, monkeypatch):
    """A full disk (or a file-size limit) met inside a writer raised an OSError naming no file: train.py's line said
    "OSError: [Errno 28] No space left on device" without saying which file. And where the temp file could not be
    removed (a folder made read-only meanwhile), that removal's error replaced the write's."""
    import errno

    path = str(tmp_path / "last.pt")

    def full(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as e:
        ckpt_io.atomic_write(path, full)
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, path)
    assert os.listdir(tmp_path) == []
    real_unlink = os.unlink

    def read_only(p, *a, **k):
        if str(p).endswith(".tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", p)
        return real_unlink(p, *a, **k)

    monkeypatch.setattr(os, "unlink", read_only)
    with pytest.raises(OSError) as e:
        ckpt_io.atomic_write(path, full)
    assert e.value.errno == errno.ENOSPC, e.value


def _tiny_build_model(backbone, num_classes, output_stride, aux_loss, fused, memory_efficient=False, width=64):
    return TinySeg(num_classes, fused=fused)


def _losses(path):
    with open(path) as f:
        return [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]


def test_train_script_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    common = ["--crop-size", "32", "--synthetic-train-size", "32", "--synthetic-val-size", "4", "--batch-size", "4",
              "--iterations", "4", "--log-every", "1", "--no-tensorboard", "--device", "cpu"]
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    train_script.main(common + ["--out-dir", full, "--eval-output-stride", "8"])
    out = capsys.readouterr().out
    assert "mIoU" in out and "metrics written to" in out
    metrics = json.load(open(os.path.join(full, "metrics.json")))["metrics"]
    assert 0.0 <= metrics["miou"] <= 1.0 and len(metrics["per_class_iou"]) == 21
    for f in ("last.pt", "best.pt", "metrics.jsonl", "predictions_val.png"):
        assert os.path.isfile(os.path.join(full, f)), f

    train_script.main(common + ["--out-dir", split, "--stop-after", "2"])
    train_script.main(common + ["--out-dir", split, "--resume"])
    assert _losses(os.path.join(split, "metrics.jsonl")) == _losses(os.path.join(full, "metrics.jsonl"))

    train_script.main(["--eval-only", "--checkpoint", os.path.join(full, "last.pt"), "--out-dir", full,
                       "--eval-scales", "0.5,1.0", "--eval-flip", "--device", "cpu"])
    assert os.path.isfile(os.path.join(full, "metrics_eval.json"))

    images = tmp_path / "photos"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(
            images / f"p{i}.jpg")
    # A phone photo stored sideways (30x20 pixels) with EXIF Orientation 6: predicted upright, as viewers show it.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(
        images / "phone.jpg", exif=exif)
    train_script.main(["--predict", str(images), "--checkpoint", os.path.join(full, "last.pt"), "--out",
                       str(tmp_path / "masks"), "--device", "cpu"])
    m = Image.open(tmp_path / "masks" / "p1.png")
    assert m.mode == "P" and m.size == (30, 21) and np.asarray(m).max() < 21
    assert Image.open(tmp_path / "masks" / "phone.png").size == (20, 30)

    # A flag error like the others: argparse's error line and exit status 2 before any work (it was status 1 after
    # the data were built), the flag named; --freeze-bn trains a batch of 1.
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        train_script.main(common + ["--out-dir", str(tmp_path / "b1"), "--batch-size", "1"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "error: --batch-size 1: batch size 1 per BatchNorm batch" in err, err
    assert not (tmp_path / "b1").exists()

    # The fused ops train channels_last by default (their fastest layout on CPU and GPU): the main job end to end.
    fused = str(tmp_path / "fused")
    train_script.main(common + ["--out-dir", fused, "--fused-ops"])
    assert json.load(open(os.path.join(fused, "metrics.json")))["metrics"]["miou"] >= 0.0
    assert torch.load(os.path.join(fused, "last.pt"), weights_only=False)["args"]["channels_last"] is True
    # A train.py checkpoint holds no numpy object: it loads weights-only, as model.load_checkpoint reads it.
    from model.checkpoint import read_state_dict

    saved = torch.load(os.path.join(fused, "last.pt"), weights_only=True)
    state = read_state_dict(os.path.join(fused, "last.pt"))
    assert state.keys() == saved["model"].keys() and all(torch.equal(state[k], saved["model"][k]) for k in state)


def test_rng_state_round_trip_through_a_weights_only_load(tmp_path):
    """capture_rng_state -> torch.save -> torch.load(weights_only=True) -> restore_rng_state: the same draws."""
    import random

    torch.manual_seed(3)
    np.random.seed(4)  # noqa: NPY002
    random.seed(5)
    np.random.rand(7)  # noqa: NPY002 (a cached position inside the key array)
    torch.save({"rng": ckpt_io.capture_rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    ckpt_io.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_cli_presets_and_memory_efficient_flag(capsys, tmp_path):
    # The synthetic CPU default is the narrow network the README's quick start describes; VOC keeps the paper's.
    args = train_script.parse_args([])
    train_script._apply_presets(args, torch.device("cpu"))
    assert (args.backbone, args.backbone_width, args.output_stride, args.iterations) == ("resnet29", 16, 8, 4000)
    args = train_script.parse_args(["--dataset", "voc", "--data-root", str(tmp_path)])
    train_script._apply_presets(args, torch.device("cpu"))
    assert (args.backbone, args.backbone_width, args.output_stride, args.crop_size) == ("resnet101", 64, 16, 513)
    with pytest.raises(SystemExit):
        train_script.parse_args(["--backbone-width", "0"])
    assert "--backbone-width must be >= 1 (the ResNet's base width), got 0" in capsys.readouterr().err
    # channels_last: on by default with the fused ops, off without; either way on request.
    assert train_script.parse_args(["--fused-ops"]).channels_last is True
    assert train_script.parse_args([]).channels_last is False
    assert train_script.parse_args(["--fused-ops", "--no-channels-last"]).channels_last is False
    assert train_script.parse_args(["--channels-last"]).channels_last is True
    # --memory-efficient is a mode of the fused ops, and reaches every fused module of the model.
    with pytest.raises(SystemExit):
        train_script.parse_args(["--memory-efficient"])
    assert "--memory-efficient is a mode of the fused ops: add --fused-ops" in capsys.readouterr().err
    from deeplab_ops.fusion import fused_config

    net = train_script.build_model("resnet29", 5, 16, False, True, memory_efficient=True, width=8)
    cfgs = [fused_config(m) for m in net.modules() if fused_config(m) is not None]
    assert cfgs and all(c.memory_efficient for c in cfgs)
    assert net.backbone.out_channels == 256  # width 8: 8 * 8 * 4


def test_a_resume_from_an_evaluation_that_set_no_new_best_is_identical(tmp_path):
    """The checkpoint before an evaluation holds the random streams of that moment; the evaluation's own draws (a
    loader's seed, here a randn) must not move the training's, or a run resumed there (after an evaluation that
    set no new best, so last.pt was not saved again) diverges from the uninterrupted one (dropout draws)."""

    def val_fn(scores):  # mIoU 0.5 at iteration 2, 0.3 at 4 (no new best), 0.4 at 6
        def run(model):
            torch.randn(3)  # what creating an evaluation loader's iterator does to the global stream
            return {"miou": scores.pop(0)}
        return run

    cfg = dict(eval_every=2)
    torch.manual_seed(0)
    init = TinySeg(dropout=0.3).state_dict()
    models = [TinySeg(dropout=0.3) for _ in range(3)]
    for m in models:
        m.load_state_dict(init)
    torch.manual_seed(1)  # the dropout draws come from the global stream
    ref = loop.fit(models[0], _train_set(), _cfg(out_dir=str(tmp_path / "a"), **cfg), CPU,
                   val_fn=val_fn([0.5, 0.3, 0.4]))
    torch.manual_seed(1)
    first = loop.fit(models[1], _train_set(), _cfg(out_dir=str(tmp_path / "b"), stop_after=4, **cfg), CPU,
                     val_fn=val_fn([0.5, 0.3]))
    assert (first.iteration, first.best_iteration) == (4, 2)
    torch.manual_seed(123)  # a different process state: everything must come from the checkpoint
    state = ckpt_io.load_checkpoint(str(tmp_path / "b" / "last.pt"))
    second = loop.fit(models[2], _train_set(), _cfg(out_dir=str(tmp_path / "b"), **cfg), CPU, val_fn=val_fn([0.4]),
                      resume=state)
    assert first.losses + second.losses == ref.losses  # bitwise on CPU
    assert (second.best_metric, second.best_iteration) == (ref.best_metric, ref.best_iteration) == (0.5, 2)


def _optimizer_after_a_step(model, frozen: bool):
    for p in (p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()):
        p.requires_grad_(not frozen)
    opt = torch.optim.SGD(loop.param_groups(model, 1e-4), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 16, 16))["out"].square().mean().backward()
    opt.step()
    return opt


@pytest.mark.parametrize("saved_frozen", [False, True], ids=["saved-trainable", "saved-frozen"])
def test_resume_with_freeze_bn_changed_carries_the_optimizer_state_by_parameter(saved_frozen):
    """--freeze-bn changed on resume: the saved optimizer covers other parameters (frozen BatchNorm parameters are
    left out), so its state is carried over parameter by parameter: what both runs train keeps its momentum."""
    torch.manual_seed(0)
    model = TinySeg()
    saved_opt = _optimizer_after_a_step(model, saved_frozen)
    saved = saved_opt.state_dict()
    momentum = {p: s["momentum_buffer"].clone() for p, s in saved_opt.state.items()}
    bn = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    for p in bn:
        p.requires_grad_(saved_frozen)  # this run: the other setting
    opt = torch.optim.SGD(loop.param_groups(model, 1e-4), lr=0.1, momentum=0.9)
    loop.load_optimizer_state(opt, saved, model, 1e-4)
    assert all(p.requires_grad == saved_frozen for p in bn)  # the flags stay as this run set them
    for p in model.parameters():
        is_bn = any(p is q for q in bn)
        if not is_bn:  # trained by both runs
            assert torch.equal(opt.state[p]["momentum_buffer"], momentum[p])
        else:  # trained by one run only: frozen now (no state), or frozen then (none yet, as in a fresh run)
            assert p not in opt.state
    other = torch.optim.SGD(loop.param_groups(TinySeg(), 1e-4), lr=0.1, momentum=0.9)
    other.param_groups[0]["params"].pop()  # another model's layout
    with pytest.raises(ValueError, match="it was saved for another model"):
        loop.load_optimizer_state(opt, other.state_dict(), model, 1e-4)


def test_train_py_resume_with_freeze_bn_changed_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    args = ["--crop-size", "32", "--synthetic-train-size", "8", "--synthetic-val-size", "2", "--batch-size", "2",
            "--no-tensorboard", "--device", "cpu", "--log-every", "1", "--preview", "0", "--out-dir",
            str(tmp_path / "run")]
    train_script.main(args + ["--iterations", "3", "--stop-after", "1"])
    train_script.main(args + ["--iterations", "3", "--stop-after", "1", "--resume", "--freeze-bn"])
    train_script.main(args + ["--iterations", "3", "--resume"])
    assert ckpt_io.checkpoint_iteration(str(tmp_path / "run" / "last.pt")) == 3


def test_a_model_with_a_child_named_module_is_saved_whole():
    # Only torch.compile's and (Distributed)DataParallel's wrappers are unwrapped before a save, not any model that
    # happens to have a submodule called `module` (it would save that child's weights alone).
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Conv2d(1, 2, 1)
            self.head = nn.Conv2d(2, 1, 1)

    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    state = ckpt_io.training_state(net, opt, sched, None, 0, None, None, {})
    assert set(state["model"]) == set(net.state_dict())
    wrapped = nn.DataParallel(net)
    assert set(ckpt_io.training_state(wrapped, opt, sched, None, 0, None, None, {})["model"]) == set(net.state_dict())

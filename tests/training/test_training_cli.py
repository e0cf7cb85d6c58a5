"""train.py's command line: flag validation, flags a command does not read, --predict's outputs, class-count
checks of --eval-only / --predict, and resume with a changed --iterations."""

import json
import os
import re
import time

import numpy as np
import pytest
import torch
from helpers import ROOT
from PIL import Image
from test_training_loop import TinySeg, _cfg, _tiny_build_model, _train_set

import train as train_script
from training import checkpoint as ckpt_io
from training import loop


def _parse_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        train_script.parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--log-every", "0"], "--log-every must be >= 1 (iterations between log lines), got 0"),
    (["--poly-power", "-1"], "--poly-power must be a finite number > 0 (the poly schedule's exponent; 0.9 in the "
                             "paper), got -1.0"),
    (["--poly-power", "0"], "--poly-power must be a finite number > 0"),
    (["--eval-scales", "0"], "--eval-scales must be 'ms' or comma-separated numbers > 0 (e.g. 0.75,1.0,1.25), "
                             "got '0'"),
    (["--eval-scales", "1.0,-0.5"], "--eval-scales must be 'ms' or comma-separated numbers > 0"),
    (["--eval-scales", "big"], "got 'big'"),
    (["--eval-every", "-1"], "--eval-every must be >= 0 (iterations between evaluations; 0 evaluates at the end "
                             "only), got -1"),
    (["--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
    (["--momentum", "-0.1"], "--momentum must be in [0, 1), got -0.1"),
    (["--preview", "-1"], "--preview must be >= 0 (images in the preview PNG; 0 for none), got -1"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be >= 1 (iterations between last.pt saves), got 0"),
    (["--checkpoint-every", "-5"], "--checkpoint-every must be >= 1"),
    (["--workers", "-1"], "--workers must be >= 0 (data-loading processes), got -1"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1 (images per batch), got 0"),
    (["--lr", "0"], "--lr must be a number > 0 and at most 3.403e+38 (float32's largest: SGD applies it to the "
                    "float32 weights), got 0.0"),
    (["--lr", "nan"], "--lr must be a number > 0 and at most 3.403e+38 (float32's largest: SGD applies it to the "
                      "float32 weights), got nan"),
    (["--lr", "inf"], "--lr must be a number > 0 and at most 3.403e+38 (float32's largest: SGD applies it to the "
                      "float32 weights), got inf"),
    # past float32's range SGD's first step failed with "value cannot be converted to type float without overflow"
    (["--lr", "1e39"], "--lr must be a number > 0 and at most 3.403e+38 (float32's largest: SGD applies it to the "
                       "float32 weights), got 1e+39"),
    (["--weight-decay=-1e-4"], "--weight-decay must be a number >= 0 and at most 3.403e+38 (float32's largest: SGD "
                               "applies it to the float32 weights), got -0.0001"),
    (["--weight-decay", "nan"], "--weight-decay must be a number >= 0 and at most 3.403e+38 (float32's largest: "
                                "SGD applies it to the float32 weights), got nan"),
    (["--weight-decay", "1e308"], "--weight-decay must be a number >= 0 and at most 3.403e+38 (float32's largest: "
                                  "SGD applies it to the float32 weights), got 1e+308"),
    (["--iterations", "0"], "--iterations must be >= 1 (training iterations), got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1 (the global batch size), got 0"),
    (["--stop-after", "0"], "--stop-after must be >= 1 (iterations to run in this invocation), got 0"),
    (["--crop-size", "8"], "--crop-size must be >= 16 (pixels: the largest output stride, 16; a smaller crop leaves "
                           "less than one feature pixel), got 8"),
    (["--scale-range", "2", "1"], "--scale-range MIN MAX must satisfy 0 < MIN <= MAX, got 2 1"),
    (["--scale-range", "0", "1"], "--scale-range MIN MAX must satisfy 0 < MIN <= MAX, got 0 1"),
    (["--synthetic-train-size", "0"], "--synthetic-train-size must be >= 1 (images), got 0"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295] (NumPy's seed range), got -1"),
    (["--data-seed", str(2**32)], "--data-seed must be in [0, 4294967295] (NumPy's seed range), got 4294967296"),
    (["--predict", "x", "--eval-only", "--checkpoint", "c.pt"],
     "--predict and --eval-only are two commands: drop --eval-only to write masks for the images in x, or drop "
     "--predict"),
    (["--checkpoint", "c.pt"], "--checkpoint c.pt is read only by --eval-only and --predict; to continue training "
                               "from a checkpoint use --resume CKPT"),
    (["--out", "m"], "--out m is --predict's output folder"),
    (["--predict", "x"], "--predict needs --checkpoint CKPT"),
    (["--data-root", "mydata"], "--data-root mydata is not read by --dataset synthetic (the default): add "
                                "--dataset folder or --dataset voc"),
])
def test_bad_flags_are_refused_before_any_work(argv, message, capsys):
    err = _parse_error(argv, capsys)
    assert message in err, err


@pytest.mark.parametrize("argv", [
    ["--out-dir", ""], ["--eval-only", "--checkpoint", "c.pt", "--out-dir", ""], ["--resume", ""],
    ["--predict", "x", "--checkpoint", "c.pt", "--out", ""], ["--predict", " ", "--checkpoint", "c.pt"],
    ["--eval-only", "--checkpoint", ""], ["--dataset", "folder", "--data-root", ""], ["--backbone-weights", ""],
])
def test_an_empty_path_is_refused_before_any_work(argv, capsys):
    # --out-dir "" (a shell variable left unset) trained and evaluated, said its checkpoints were saved, saved none
    # (the loop read "" as "do not save") and then failed: the trained model was lost. --out "" fell back to
    # predictions/ unsaid.
    flag = next(a for a, v in zip(argv, argv[1:], strict=False) if a.startswith("--") and not v.strip())
    err = _parse_error(argv, capsys)
    assert f"{flag} expects " in err and "got an empty value" in err, err


def test_output_folders_that_are_files_are_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert f"--out-dir {tmp_path / 'f'}: exists and is not a folder" in _parse_error(
        ["--out-dir", str(tmp_path / "f")], capsys)
    assert f"--out {tmp_path / 'f'}: exists and is not a folder" in _parse_error(
        ["--predict", "p", "--checkpoint", "c.pt", "--out", str(tmp_path / "f")], capsys)


@pytest.mark.parametrize("command", ["train", "eval-only", "predict"])
def test_output_folders_that_cannot_be_made_are_refused_before_any_work(tmp_path, capsys, command):
    """An --out-dir (--out) under a file, or where nothing can be written (/proc), is an argument error before any
    work (it was a traceback once the data and the model were built)."""
    (tmp_path / "f").write_text("x")
    flag = "--out" if command == "predict" else "--out-dir"
    extra = {"train": [], "eval-only": ["--eval-only", "--checkpoint", "c.pt"],
             "predict": ["--predict", str(tmp_path), "--checkpoint", "c.pt"]}[command]
    for folder, problem in ((tmp_path / "f" / "sub", f"{tmp_path / 'f'} is a file, not a folder"),
                            ("/proc/deeplab_ops_nowhere", "cannot write there")):
        with pytest.raises(SystemExit) as stop:
            train_script.main([*extra, flag, str(folder), "--device", "cpu"])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert f"{flag} {folder}: " in err and problem in err, err
        assert not os.path.exists(folder)


def test_help_shows_each_example_command_as_written():
    """--help prints the module docstring's examples: the VOC one continues on a second line after a shell
    backslash (a bare backslash at the line's end in the docstring joined the two lines into one with a gap)."""
    text = train_script.build_parser().format_help()
    assert "--fused-ops \\\n        --backbone-weights resnet101.pth" in text


def test_good_flags_pass_and_unread_flags_warn(capsys):
    args = train_script.parse_args(["--eval-scales", "ms", "--momentum", "0", "--eval-every", "0", "--preview", "0",
                                    "--workers", "0", "--scale-range", "1", "1", "--crop-size", "16"])
    assert train_script._eval_scales(args) == train_script.MS_SCALES
    assert capsys.readouterr().err == ""
    train_script.parse_args(["--sbd-root", "sbd", "--classes", "c.txt", "--val-split", "v"])
    err = capsys.readouterr().err
    for flag in ("--sbd-root", "--classes", "--val-split"):
        assert f"warning: {flag} is not read by --dataset synthetic; ignoring it" in err
    train_script.parse_args(["--eval-only", "--resume", "--iterations", "5"])
    err = capsys.readouterr().err
    assert "--resume is a training flag; --eval-only ignores it" in err and "--iterations is a training flag" in err


def test_sbd_root_without_the_train_aug_split_warns(capsys, tmp_path):
    """--sbd-root serves VOC's train_aug split only: with --train-split train it was ignored without a word."""
    voc = tmp_path / "VOC2012"
    voc.mkdir()
    voc_args = ["--dataset", "voc", "--data-root", str(voc), "--sbd-root", "sbd"]
    train_script.parse_args(voc_args)  # train_aug, the default: read
    assert "--sbd-root" not in capsys.readouterr().err
    # (not with --eval-only or --resume, which restore a VOC run's --sbd-root from its checkpoint, given or not)
    for extra, reads in ((["--train-split", "train"], "'val' and 'train'"),
                         (["--train-split", "train", "--val-split", "train"], "'train'")):
        train_script.parse_args(voc_args + extra)
        err = capsys.readouterr().err
        assert f"warning: --sbd-root sbd is read only for the train_aug split, and this run reads {reads}; ignoring " \
               "it" in err, err
    train_script.parse_args(voc_args + ["--train-split", "train", "--val-split", "train_aug"])
    assert "--sbd-root" not in capsys.readouterr().err
    args = train_script.parse_args(voc_args + ["--train-split", "train"])
    capsys.readouterr()
    args.resume = "auto"  # as main() calls it once a --resume checkpoint's flags are restored
    train_script.check_dataset_flags(args, train_script._flag_error, check_root=False)
    assert "--sbd-root" not in capsys.readouterr().err


def test_flags_predict_and_eval_only_do_not_read_warn(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p").mkdir()
    train_script.parse_args(["--predict", "p", "--checkpoint", "c.pt", "--out-dir", "o", "--lr", "0.1",
                             "--data-root", "d"])
    err = capsys.readouterr().err
    assert "--out-dir is not read by --predict, which writes masks for the images in p to --out" in err
    assert "--lr is a training flag; --predict ignores it (the model comes from the checkpoint)" in err
    assert "--data-root d is not read by --predict without --dataset folder" in err
    train_script.parse_args(["--eval-only", "--memory-efficient", "--fused-ops", "--momentum", "0.5"])
    err = capsys.readouterr().err
    assert "--memory-efficient is a training flag; --eval-only ignores it" in err and "--momentum is a" in err
    assert "--fused-ops" not in err  # read: the evaluation runs on the fused ops
    train_script.parse_args(["--eval-only", "--train-split", "mine"])
    assert "--train-split is not read by --eval-only, which evaluates the validation split" in capsys.readouterr().err


@pytest.mark.parametrize("dataset", ["folder", "voc"])
def test_a_missing_data_root_is_a_flag_error(dataset, tmp_path, capsys):
    # (before: exit status 1 from the loader, no argparse error line)
    want = "the VOC2012 folder" if dataset == "voc" else "a folder with images/, masks/ and classes.txt"
    assert f"error: --dataset {dataset} needs --data-root PATH ({want})" in _parse_error(
        ["--dataset", dataset], capsys)
    nowhere, file = tmp_path / "nowhere", tmp_path / "file"
    file.write_text("x")
    assert f"error: --data-root {nowhere}: no such folder" in _parse_error(
        ["--dataset", dataset, "--data-root", str(nowhere)], capsys)
    assert f"error: --data-root {file}: not a folder" in _parse_error(
        ["--dataset", dataset, "--data-root", str(file)], capsys)


def test_dataset_and_resume_errors_exit_naming_the_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    with pytest.raises(SystemExit, match=r"--dataset folder: folder dataset: .*images does not exist"):
        train_script.main(["--dataset", "folder", "--data-root", str(tmp_path), "--device", "cpu"])
    common = ["--crop-size", "32", "--synthetic-train-size", "8", "--synthetic-val-size", "2", "--batch-size", "2",
              "--no-tensorboard", "--device", "cpu", "--out-dir", str(tmp_path / "run"), "--preview", "0",
              "--log-every", "1"]
    with pytest.raises(SystemExit, match=r"--resume .*last\.pt: checkpoint not found"):
        train_script.main(common + ["--iterations", "2", "--resume"])
    train_script.main(common + ["--iterations", "2"])
    with pytest.raises(SystemExit, match=r"the checkpoint is at iteration 2, beyond --iterations 1; give "
                                         r"--iterations >= 2"):
        train_script.main(common + ["--iterations", "1", "--resume"])
    # Resuming the finished run with more iterations and a lower --lr (what the NaN-loss message advises): the
    # log's lr continues on the new 4-iteration schedule of the new lr.
    train_script.main(common + ["--iterations", "4", "--resume", "--lr", "0.01"])
    lrs = [r["lr"] for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if r["kind"] == "train"]
    assert lrs[-2:] == [0.01 * loop.poly_lambda(4, 0.9)(i) for i in (2, 3)]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["optimizer"]["param_groups"][0]["lr"] == 0.0


def test_amp_fp16_on_cpu_is_refused_naming_the_flag(capsys, monkeypatch, tmp_path):
    """A flag error like the others (argparse's error: line, status 2), for every command, whether the CPU is
    chosen by --device cpu or is all there is; a GradScaler named only where one would train."""
    for argv, scaler in ((["--amp", "fp16", "--device", "cpu"], " with a GradScaler"),
                         (["--amp", "fp16", "--eval-only", "--device", "cpu"], ""),
                         (["--amp", "fp16", "--predict", str(tmp_path), "--checkpoint", "c.pt", "--device", "cpu"],
                          "")):
        assert f"error: --amp fp16 needs a CUDA device (fp16 autocast{scaler}), not --device cpu; use --amp " \
               "bf16 or none" in _parse_error(argv, capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "error: --amp fp16 needs a CUDA device (fp16 autocast with a GradScaler), not a CPU (no CUDA device is " \
           "visible); use --amp bf16 or none" in _parse_error(["--amp", "fp16"], capsys)
    assert "error: --device cuda: no CUDA device is visible (use --device cpu, or auto)" in _parse_error(
        ["--device", "cuda"], capsys)
    train_script.parse_args(["--amp", "bf16", "--device", "cpu"])


def _checkpoint(path, num_classes, dataset="synthetic", **saved):
    torch.manual_seed(0)
    state = {"model": TinySeg(num_classes).state_dict(), "num_classes": num_classes, "iteration": 3,
             "args": {"dataset": dataset, "backbone": "resnet29", "output_stride": 8, "crop_size": 32,
                      "synthetic_val_size": 2, **saved}}
    torch.save(state, path)
    return str(path)


def _photos(folder, names):
    folder.mkdir(exist_ok=True)
    for i, n in enumerate(names):
        img = np.random.default_rng(i).integers(0, 256, (18, 20, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / n)
    return {n: (folder / n).read_bytes() for n in names}


def test_predict_never_overwrites_inputs_and_names_colliding_stems_apart(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    ckpt = _checkpoint(tmp_path / "c.pt", 21)
    photos = tmp_path / "photos"
    before = _photos(photos, ["a.png", "b.jpg"])
    # --out equal to the input folder: a.png's mask would replace the photo a.png. Nothing is written.
    with pytest.raises(SystemExit, match=r"refusing to write masks into the input folder .*photos"):
        train_script.main(["--predict", str(photos), "--checkpoint", ckpt, "--out", str(photos) + "/", "--device",
                           "cpu"])
    # An output folder holding a link to an input photo under a mask's name: refused too.
    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink(photos / "a.png", linked / "a.png")
    with pytest.raises(SystemExit, match=r"refusing to write any mask: .*a\.png would overwrite the input image"):
        train_script.main(["--predict", str(photos), "--checkpoint", ckpt, "--out", str(linked), "--device", "cpu"])
    assert sorted(os.listdir(photos)) == ["a.png", "b.jpg"] and os.listdir(linked) == ["a.png"]
    assert all((photos / n).read_bytes() == data for n, data in before.items())

    # x.png and x.jpg: distinct masks x.png.png and x.jpg.png, and the count printed is the count written.
    _photos(photos, ["x.png", "x.jpg"])
    out = tmp_path / "masks"
    train_script.main(["--predict", str(photos), "--checkpoint", ckpt, "--out", str(out), "--device", "cpu"])
    assert sorted(os.listdir(out)) == ["a.png", "b.png", "x.jpg.png", "x.png.png"]
    printed = capsys.readouterr().out
    assert "wrote 4 colour-coded masks" in printed and "2 of them named <file>.png" in printed
    # A rerun replaces its own masks; a foreign file in the way is refused, and left alone: an RGB PNG, and a
    # VOC-palette mask not written by --predict (a dataset's ground truth: VOC's SegmentationClass).
    train_script.main(["--predict", str(photos), "--checkpoint", ckpt, "--out", str(out), "--device", "cpu"])
    truth = Image.fromarray(np.ones((4, 4), np.uint8), mode="P")
    truth.putpalette(train_script.palette_bytes())
    for foreign_image in (Image.fromarray(np.zeros((4, 4, 3), np.uint8)), truth):
        foreign_image.save(out / "b.png")
        foreign = (out / "b.png").read_bytes()
        with pytest.raises(SystemExit, match=r"b\.png exists and is not a mask written by --predict"):
            train_script.main(["--predict", str(photos), "--checkpoint", ckpt, "--out", str(out), "--device",
                               "cpu"])
        assert (out / "b.png").read_bytes() == foreign
    # Class count of an explicitly named dataset.
    with pytest.raises(SystemExit, match="--predict: --checkpoint .* predicts 21 classes, but --dataset folder "
                                         ".* has 3"):
        (tmp_path / "classes.txt").write_text("bg\ncat\ndog\n")
        train_script.main(["--predict", str(photos), "--checkpoint", ckpt, "--out", str(tmp_path / "m2"),
                           "--dataset", "folder", "--data-root", str(tmp_path), "--device", "cpu"])
    assert not (tmp_path / "m2").exists()


def test_mask_names():
    assert train_script.mask_names(["a.jpg", "b.png", "B.jpg", "c.tif"]) == {
        "a.jpg": "a.png", "b.png": "b.png.png", "B.jpg": "B.jpg.png", "c.tif": "c.png"}


def test_eval_only_refuses_a_checkpoint_with_another_class_count(tmp_path, monkeypatch):
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    ckpt = _checkpoint(tmp_path / "best.pt", 3, dataset="folder", data_root=str(tmp_path / "mydata"))
    with pytest.raises(SystemExit, match=r"--eval-only: --checkpoint .*best\.pt predicts 3 classes, but --dataset "
                                         r"synthetic has 21; use a checkpoint trained on this dataset"):
        train_script.main(["--eval-only", "--checkpoint", ckpt, "--dataset", "synthetic", "--out-dir",
                           str(tmp_path / "run"), "--device", "cpu"])
    assert not (tmp_path / "run").exists()
    # The same class count evaluates.
    ok = _checkpoint(tmp_path / "ok.pt", 21)
    train_script.main(["--eval-only", "--checkpoint", ok, "--out-dir", str(tmp_path / "run"), "--device", "cpu",
                       "--preview", "0"])
    assert os.path.isfile(tmp_path / "run" / "metrics_eval.json")


class _Log:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


def test_resume_with_more_iterations_follows_the_new_poly_schedule(tmp_path):
    torch.manual_seed(0)
    model = TinySeg()
    cfg = _cfg(iterations=4, out_dir=str(tmp_path), lr=0.02)
    loop.fit(model, _train_set(), cfg, torch.device("cpu"))
    state = ckpt_io.load_checkpoint(str(tmp_path / "last.pt"))
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.0  # the finished 4-iteration schedule
    log = _Log()
    result = loop.fit(TinySeg(), _train_set(), _cfg(iterations=7, out_dir=str(tmp_path), lr=0.02),
                      torch.device("cpu"), resume=state, log=log)
    assert [i for i, _ in result.losses] == [5, 6, 7]
    lrs = [r["lr"] for r in log.records if r["kind"] == "train"]
    # Iteration i + 1 runs at lr(i) = 0.02 (1 - i/7)^0.9: from where the new schedule is at iteration 4.
    assert lrs == [0.02 * loop.poly_lambda(7, 0.9)(i) for i in (4, 5, 6)]
    assert lrs[0] > 0.005


def test_resume_applies_this_runs_momentum_and_weight_decay(tmp_path):
    torch.manual_seed(0)
    loop.fit(TinySeg(), _train_set(), _cfg(iterations=2, out_dir=str(tmp_path)), torch.device("cpu"))
    state = ckpt_io.load_checkpoint(str(tmp_path / "last.pt"))
    loop.fit(TinySeg(), _train_set(), _cfg(iterations=3, out_dir=str(tmp_path), momentum=0.5, weight_decay=0.01),
             torch.device("cpu"), resume=state)
    groups = ckpt_io.load_checkpoint(str(tmp_path / "last.pt"))["optimizer"]["param_groups"]
    seen = [(g["momentum"], g["weight_decay"], g["initial_lr"]) for g in groups]
    assert seen == [(0.5, 0.01, 0.02), (0.5, 0.0, 0.02)]


@pytest.mark.parametrize("variable, value, message", [
    ("DEEPLAB_OPS_BACKEND", "bogus", "DEEPLAB_OPS_BACKEND='bogus' is not a backend"),
    ("DEEPLAB_OPS_CPU_WINOGRAD", "off", "DEEPLAB_OPS_CPU_WINOGRAD='off' is not 0 or 1"),
])
def test_bad_environment_is_refused_before_any_work(variable, value, message, capsys, monkeypatch):
    monkeypatch.setenv(variable, value)
    assert message in _parse_error(["--iterations", "1"], capsys)


def test_a_bad_autotune_mode_is_refused_where_the_fused_ops_run(capsys, monkeypatch):
    # every triton-backend call raised it (at the backend's first import), after the data and model were built
    monkeypatch.setenv("DEEPLAB_OPS_AUTOTUNE", "sometimes")
    assert "DEEPLAB_OPS_AUTOTUNE='sometimes' is not an autotune mode" in _parse_error(["--fused-ops"], capsys)
    train_script.parse_args(["--iterations", "1"])  # the unfused network never reads it


def test_a_triton_interpret_value_triton_reads_as_off_is_off(capsys, monkeypatch):
    # any value but "" and "0" counted as on ("off", "false", "2"): python -m deeplab_ops said triton was usable and
    # calls crashed in Triton ("0 active drivers"); DEEPLAB_OPS_BACKEND=triton got past train.py's check
    from deeplab_ops.common import interpreter_active
    for value, on in (("off", False), ("false", False), ("2", False), ("0", False), ("", False), ("1", True),
                      ("yes", True), ("ON", True)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert interpreter_active() is on, value
    monkeypatch.setenv("TRITON_INTERPRET", "off")
    monkeypatch.setenv("DEEPLAB_OPS_BACKEND", "triton")
    err = _parse_error(["--fused-ops", "--device", "cpu"], capsys)
    assert "DEEPLAB_OPS_BACKEND=triton cannot run the fused ops on --device cpu" in err, err


def test_a_backend_forced_by_the_environment_that_cannot_run_on_the_device_is_refused(capsys, monkeypatch):
    """DEEPLAB_OPS_BACKEND=cuda with --fused-ops on a CPU run: an argument error naming why, before any work (the
    fused ops refused it at the first step, in a 40-line traceback); an unfused run does not read it."""
    monkeypatch.setenv("DEEPLAB_OPS_BACKEND", "cuda")
    err = _parse_error(["--fused-ops", "--device", "cpu"], capsys)
    assert "DEEPLAB_OPS_BACKEND=cuda cannot run the fused ops on --device cpu (it runs CUDA tensors" in err, err
    train_script.parse_args(["--device", "cpu"])
    monkeypatch.setenv("DEEPLAB_OPS_BACKEND", "reference")
    train_script.parse_args(["--fused-ops", "--device", "cpu"])


def test_predict_checks_every_image_before_writing_any_mask(tmp_path, monkeypatch):
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    ckpt = _checkpoint(tmp_path / "c.pt", 21)
    photos = tmp_path / "photos"
    _photos(photos, ["a.jpg"])
    (photos / "z.jpg").write_bytes(b"not an image")
    out = tmp_path / "masks"
    with pytest.raises(SystemExit, match=r"^--predict: cannot read image .*z\.jpg: .*; no mask was written"):
        train_script.main(["--predict", str(photos), "--checkpoint", ckpt, "--out", str(out), "--device", "cpu"])
    assert not out.exists() or not os.listdir(out)


def _gray_folder(root, classes, count, size, ext):
    """A folder dataset of `count` flat images im{i}{ext} (gray level 40 i) whose masks hold class i % len(classes)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    for i in range(count):
        Image.fromarray(np.full((*size, 3), 40 * i, np.uint8)).save(root / "images" / f"im{i}{ext}")
        Image.fromarray(np.full(size, i % len(classes), np.uint8), mode="L").save(root / "masks" / f"im{i}.png")
    return root


def test_hidden_files_beside_the_images_are_skipped(tmp_path, monkeypatch):
    """Found by a review: macOS's "._x.jpg" resource forks (one beside every copied file) were counted as images, and
    a folder dataset crashed mid-training on the first one drawn; --predict refused the whole folder (and left a
    broken link out of its output silently)."""
    from training import datasets

    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    root = _gray_folder(tmp_path / "mydata", ["background", "thing"], 3, (10, 12), ".jpg")
    for i in range(3):
        (root / "images" / f"._im{i}.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (root / "masks" / f"._im{i}.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "val.txt").write_text("im2\n")
    train = datasets.FolderSegmentation(str(root), "train")
    assert [n for n, _, _ in train.items] == ["im0", "im1"]
    for i in range(len(train)):
        assert train[i][0].shape == (10, 12, 3)
    ckpt = _checkpoint(tmp_path / "c.pt", 21)
    out = tmp_path / "masks"
    train_script.main(["--predict", str(root / "images"), "--checkpoint", ckpt, "--out", str(out), "--device", "cpu"])
    assert sorted(os.listdir(out)) == ["im0.png", "im1.png", "im2.png"]
    # a broken link among the photos is named, not left out of the output without a word
    os.symlink(root / "images" / "gone.jpg", root / "images" / "im3.jpg")
    with pytest.raises(SystemExit, match=r"--predict: .*im3\.jpg is a broken link \(its target '.*gone\.jpg' does "
                                         r"not exist\); no mask was written"):
        train_script.main(["--predict", str(root / "images"), "--checkpoint", ckpt, "--out", str(tmp_path / "m2"),
                           "--device", "cpu"])


def test_eval_only_reads_the_validation_split_the_run_used(tmp_path, monkeypatch, capsys):
    """--eval-only restores a folder dataset's --val-split (and its root and classes) from the checkpoint, builds
    only that split (the training split may be gone), and warns about nothing the user did not type."""
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    root = _gray_folder(tmp_path / "mydata", ["background", "cat", "dog"], 5, (34, 36), ".png")
    (root / "holdout.txt").write_text("im3\nim4\n")  # the run's --val-split; its --train-split list is not there
    # The saved arguments as a training run writes them: presets filled in (synthetic sizes, data seed) too.
    ckpt = _checkpoint(tmp_path / "best.pt", 3, dataset="folder", data_root=str(root), classes=None,
                       train_split="mine", val_split="holdout", sbd_root=None, data_seed=0,
                       synthetic_train_size=4000)
    capsys.readouterr()
    train_script.main(["--eval-only", "--checkpoint", ckpt, "--out-dir", str(tmp_path / "run"), "--device", "cpu",
                       "--preview", "0"])
    assert "warning" not in capsys.readouterr().err
    record = json.load(open(tmp_path / "run" / "metrics_eval.json"))
    # (the training split is recorded as the run's recipe, like its other training flags; it was not read)
    assert record["args"]["val_split"] == "holdout" and record["args"]["train_split"] == "mine"
    assert record["args"]["data_root"] == str(root)
    # The same root spelled otherwise (a trailing slash), and --data-root without --dataset: still the run's
    # dataset and split.
    for extra in (["--data-root", str(root) + "/"], ["--dataset", "folder", "--data-root", str(root) + "/."]):
        train_script.main(["--eval-only", "--checkpoint", ckpt, "--out-dir", str(tmp_path / "run"), "--device",
                           "cpu", "--preview", "0", *extra])
        record = json.load(open(tmp_path / "run" / "metrics_eval.json"))
        assert (record["args"]["dataset"], record["args"]["val_split"]) == ("folder", "holdout"), extra
        # a rerun replaces the earlier evaluation's record, and says which (it vanished without a word)
        assert re.search(r"metrics written to .*metrics_eval\.json \(replacing the earlier evaluation of .*best\.pt "
                         r"at iteration \d+, --eval-output-stride \d+, --eval-scales 1\.0: mIoU \d+\.\d\d\)",
                         capsys.readouterr().out), extra
    # The validation split the user names wins over the saved one.
    with pytest.raises(SystemExit, match="--dataset folder: .*missing"):
        train_script.main(["--eval-only", "--checkpoint", ckpt, "--out-dir", str(tmp_path / "run"), "--device",
                           "cpu", "--preview", "0", "--val-split", "missing"])
    # Another --data-root is another dataset: none of the run's split flags are carried over to it.
    import shutil

    other = tmp_path / "other"
    shutil.copytree(root, other)
    (other / "holdout.txt").unlink()
    (other / "val.txt").write_text("im0\n")
    train_script.main(["--eval-only", "--checkpoint", ckpt, "--out-dir", str(tmp_path / "run2"), "--device", "cpu",
                       "--preview", "0", "--dataset", "folder", "--data-root", str(other)])
    assert json.load(open(tmp_path / "run2" / "metrics_eval.json"))["args"]["val_split"] is None


def test_backbone_weights_of_another_resnet_name_the_flags_that_fit(tmp_path):
    """--backbone-weights from a ResNet of another depth or width stops train.py before any work, in one message
    that names the flag, the backbone it was given and the flags the file fits; an unreadable file likewise."""
    from model.resnet import ResNet

    weights = tmp_path / "r50w8.pth"
    torch.save(ResNet(50, width=8).state_dict(), weights)
    common = ["--crop-size", "32", "--synthetic-train-size", "4", "--synthetic-val-size", "2", "--batch-size", "2",
              "--iterations", "1", "--no-tensorboard", "--device", "cpu", "--out-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as e:
        train_script.main(common + ["--backbone", "resnet29", "--backbone-width", "16", "--backbone-weights",
                                    str(weights)])
    message = str(e.value)
    assert message.startswith(f"--backbone-weights {weights} does not fit --backbone resnet29 --backbone-width 16; "
                              "the file holds a --backbone resnet50 --backbone-width 8: train with those flags")
    assert len(message.splitlines()) == 1
    # A file that cannot be read is named with what is wrong with it (model.checkpoint.load_file's words, as for
    # --checkpoint and --resume), not as one that "does not fit", and without torch's weights_only advice.
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "folder").mkdir()
    for path, says in [(tmp_path / "junk.pth", " (16 bytes): it is corrupt or truncated, or not a torch.save file "
                                               "(its first bytes are neither a zip archive (torch.save's format) "
                                               "nor a pickle: it reads as text)"),
                       (tmp_path / "folder", ": this is a folder; give a checkpoint file in it"),
                       (tmp_path / "nothing.pth", None)]:
        with pytest.raises(SystemExit) as e:
            train_script.main(common + ["--backbone", "resnet29", "--backbone-width", "16", "--backbone-weights",
                                        str(path)])
        expected = f"--backbone-weights {path}: checkpoint not found: {path} (no such file" if says is None else \
            f"--backbone-weights {path}: cannot read checkpoint {path}{says}"
        assert str(e.value).startswith(expected), str(e.value)
        assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run" / "last.pt").exists()
    # Not one of model/'s ResNets (torchvision's resnet34 has ResNet-50's blocks per stage, in basic blocks): no
    # hint, rather than one naming the flags that just failed. An empty file says so.
    from torchvision.models import resnet34

    r34 = tmp_path / "r34.pth"
    torch.save(resnet34().state_dict(), r34)
    with pytest.raises(SystemExit) as e:
        train_script.main(common + ["--backbone", "resnet50", "--backbone-width", "8", "--backbone-weights", str(r34)])
    assert str(e.value).startswith(f"--backbone-weights {r34} does not fit --backbone resnet50 --backbone-width 8 (")
    assert "the file holds" not in str(e.value)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"^--backbone-weights \S*empty\.pth: cannot read checkpoint \S*empty\.pth: "
                                         r"the file is empty \(0 bytes\)$"):
        train_script.main(common + ["--backbone", "resnet29", "--backbone-width", "16", "--backbone-weights",
                                    str(tmp_path / "empty.pth")])
    # The file that fits trains.
    fits = tmp_path / "r29w16.pth"
    torch.save(ResNet(29, width=16).state_dict(), fits)
    train_script.main(common + ["--backbone", "resnet29", "--backbone-width", "16", "--backbone-weights", str(fits),
                                "--preview", "0"])
    assert (tmp_path / "run" / "last.pt").exists()
    # The loader's hint stays under the one line: here, a key prefix to remove (only its first line was kept).
    prefixed = tmp_path / "prefixed.pth"
    torch.save({f"model.{k}": v for k, v in ResNet(29, width=16).state_dict().items()}, prefixed)
    with pytest.raises(SystemExit) as e:
        train_script.main(common + ["--backbone", "resnet29", "--backbone-width", "16", "--backbone-weights",
                                    str(prefixed), "--out-dir", str(tmp_path / "run_prefixed")])
    first, *hints = str(e.value).splitlines()
    assert first.startswith(f"--backbone-weights {prefixed} does not fit --backbone resnet29 --backbone-width 16 ("), \
        first
    assert len(hints) == 1 and hints[0].startswith("  hint: ") and "'model.' prefix" in hints[0], hints


def test_a_resume_does_not_read_backbone_weights(tmp_path, capsys):
    """--resume with --backbone-weights loaded the file, which the checkpoint's weights then replaced: one that did
    not fit (or had moved) stopped the resume, and one that fitted was said to initialise the run."""
    from torchvision.models import resnet34

    r34 = tmp_path / "r34.pth"
    torch.save(resnet34().state_dict(), r34)
    run = ["--crop-size", "32", "--synthetic-train-size", "4", "--synthetic-val-size", "2", "--batch-size", "2",
           "--iterations", "3", "--no-tensorboard", "--device", "cpu", "--out-dir", str(tmp_path / "run"),
           "--backbone", "resnet29", "--backbone-width", "8", "--preview", "0", "--stop-after", "1"]
    train_script.main(run)
    capsys.readouterr()
    for step, weights in ((2, r34), (3, tmp_path / "gone.pth")):  # a file that does not fit; one that has gone
        train_script.main(run + ["--resume", "--backbone-weights", str(weights)])
        err = capsys.readouterr().err
        assert f"note: --backbone-weights {weights} is not read: --resume continues from " in err, err
        assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["iteration"] == step


def _mask_folder(root, bad: str, val: str):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    for i in range(6):
        Image.fromarray(np.full((36, 36, 3), 40 * i, np.uint8)).save(root / "images" / f"im{i}.png")
        mask = np.full((36, 36), i % 3, np.uint8)
        if f"im{i}" == bad:
            mask[3, 4] = 7
        Image.fromarray(mask, mode="L").save(root / "masks" / f"im{i}.png")
    (root / "val.txt").write_text(val)
    return str(root)


@pytest.mark.parametrize("where, workers", [("val", "0"), ("train", "0"), ("train", "1")])
def test_a_bad_mask_met_in_training_or_evaluation_stops_in_one_line(tmp_path, monkeypatch, where, workers):
    """A mask with a class index the class list does not have, met while training (in the process or in a
    DataLoader worker) or evaluating: train.py names the file and what is wrong in one line, and the checkpoint
    written before the evaluation stays."""
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    root = _mask_folder(tmp_path / "data", bad="im5" if where == "val" else "im0", val="im4\nim5\n")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train_script.main(["--dataset", "folder", "--data-root", root, "--crop-size", "32", "--batch-size", "2",
                           "--iterations", "2", "--no-tensorboard", "--device", "cpu", "--out-dir", str(out),
                           "--workers", workers, "--preview", "0"])
    message = str(e.value)
    bad = os.path.join(root, "masks", "im5.png" if where == "val" else "im0.png")
    kept = f"; the checkpoints written so far (last.pt) are in {out}" if where == "val" else ""
    assert message == (f"train.py: bad mask {bad}: class indices [7] are >= num_classes=3 (and not the ignore label "
                       f"255){kept}")
    assert (out / "last.pt").exists() == (where == "val")


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_and_sigterm_say_what_is_saved_and_how_to_go_on(how, tmp_path, monkeypatch, capsys):
    """Ctrl-C or SIGTERM (kill, timeout, a scheduler's preemption; it ended the process without a word, its loader's
    workers left behind) while training: no traceback, exit status 130 / 143, and the checkpoints kept (with their
    iterations) and that --resume continues; the SIGTERM handler train.py set is removed when main returns."""
    import dataclasses
    import signal
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    out = tmp_path / "run"
    real_fit = loop.fit

    def stopped(model, train_set, cfg, *args, **kwargs):
        real_fit(model, train_set, dataclasses.replace(cfg, stop_after=1), *args, **kwargs)
        if how == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # (the handler raises at once)
        raise AssertionError("SIGTERM was not raised")

    monkeypatch.setattr(loop, "fit", stopped)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        train_script.main(["--crop-size", "32", "--synthetic-train-size", "8", "--synthetic-val-size", "2",
                           "--batch-size", "2", "--iterations", "4", "--no-tensorboard", "--device", "cpu",
                           "--out-dir", str(out)])
    assert stop.value.code == (130 if how == "ctrl-c" else 143)
    err = capsys.readouterr().err
    said = "interrupted" if how == "ctrl-c" else "terminated (SIGTERM)"
    assert f"train.py: {said}; last.pt (iteration 1) in {out}: --resume continues from last.pt" in err, err
    assert "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_folder_with_no_last_checkpoint_is_not_offered_to_resume(tmp_path, capsys):
    """An --out-dir holding only best.pt (or a preview) of an earlier run: refused, without suggesting --resume
    (which would find no last.pt)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "predictions_val.png").write_bytes(b"x")
    with pytest.raises(SystemExit) as stop:
        train_script.main(["--out-dir", str(out), "--device", "cpu"])
    message = capsys.readouterr().err.strip().splitlines()[-1]  # (after the usage, which lists every flag)
    assert stop.value.code == 2 and "holds an earlier run" in message and "--resume" not in message, message


def test_batch_size_1_is_a_flag_error_unless_bn_is_frozen_or_processes_share_the_batch(capsys, monkeypatch):
    err = _parse_error(["--batch-size", "1"], capsys)
    assert "error: --batch-size 1: batch size 1 per BatchNorm batch" in err and "--freeze-bn" in err, err
    train_script.parse_args(["--batch-size", "1", "--freeze-bn"])
    train_script.parse_args(["--eval-only", "--checkpoint", "x.pt", "--batch-size", "1"])  # read by training only
    # torchrun: every BatchNorm is synchronized over the processes
    for name, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    train_script.parse_args(["--batch-size", "2"])


def test_train_and_val_lists_sharing_images_are_named(tmp_path, capsys):
    # Two list files that name the same image: the validation scores would measure training images (a warning:
    # evaluating on training images can be meant).
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "classes.txt").write_text("background\nthing\n")
    for i in range(4):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / f"im{i}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(tmp_path / "masks" / f"im{i}.png")
    (tmp_path / "train.txt").write_text("im0\nim1\nim2\n")
    (tmp_path / "val.txt").write_text("im2\nim3\n")
    args = train_script.parse_args(["--dataset", "folder", "--data-root", str(tmp_path)])
    capsys.readouterr()
    train_set, val_set, _ = train_script.build_datasets(args)
    err = capsys.readouterr().err
    assert len(train_set) == 3 and len(val_set) == 2
    assert "split 'train' and the validation split 'val' share 1 of 2 validation images" in err, err
    assert "im2.png" in err
    (tmp_path / "val.txt").write_text("im3\n")
    train_script.build_datasets(args)
    assert "share" not in capsys.readouterr().err


def test_images_in_formats_not_read_are_named_not_skipped_silently(tmp_path, monkeypatch, capsys):
    """A .gif (or .ppm, .jp2: formats PIL reads) among the images was skipped without a word, by the folder dataset
    and by --predict; other files (a README) are no images to miss. Now one warning names them and how to use them."""
    from training import datasets

    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    root = _gray_folder(tmp_path / "mydata", ["background", "thing"], 3, (10, 12), ".png")
    (root / "val.txt").write_text("im2\n")
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(root / "images" / "extra.gif")
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(root / "images" / "more.ppm")
    (root / "images" / "README.txt").write_text("photos of things\n")
    (root / "images" / "notes.pdf").write_bytes(b"%PDF-1.4")  # formats PIL lists but opens no picture of: not named
    (root / "images" / "depth.h5").write_bytes(b"\x89HDF")
    with pytest.warns(UserWarning, match=r"folder dataset .*mydata: 2 files in .*images \(e\.g\. 'extra\.gif'\) are "
                                         r"in a format not read here \(\.gif, \.ppm; read: \.jpg.*\) and skipped: "
                                         "convert them to PNG or JPEG to use them"):
        train = datasets.FolderSegmentation(str(root), "train")
    assert [n for n, _, _ in train.items] == ["im0", "im1"]
    ckpt = _checkpoint(tmp_path / "c.pt", 21)
    out = tmp_path / "masks"
    (root / "images" / "more.ppm").unlink()
    train_script.main(["--predict", str(root / "images"), "--checkpoint", ckpt, "--out", str(out), "--device", "cpu"])
    assert sorted(os.listdir(out)) == ["im0.png", "im1.png", "im2.png"]
    assert re.search(r"warning: --predict: 1 file in .*images \(e\.g\. 'extra\.gif'\) is in a format not read here "
                     r"\(\.gif; .*convert it to PNG or JPEG to use it", capsys.readouterr().err)
    (root / "images" / "extra.gif").unlink()  # a folder of readable images only: no warning
    train_script.main(["--predict", str(root / "images"), "--checkpoint", ckpt, "--out", str(tmp_path / "m2"),
                       "--device", "cpu"])
    assert "format not read" not in capsys.readouterr().err


def test_backbone_weights_from_a_whole_deeplabv3_state_dict_take_its_backbone(tmp_path, capsys):
    """A torchvision deeplabv3_resnet50 file (or a train.py checkpoint) given to --backbone-weights was refused with
    advice for Python ("use load_checkpoint(model, ...)"), and the command line had no way to start from such
    weights. Its backbone.* entries now initialise the backbone; a note names the heads left out."""
    from torchvision.models.segmentation import deeplabv3_resnet50

    tv = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    net = train_script.build_model("resnet50", 5, 16, False, False)
    train_script.load_backbone_weights(net, str(tmp_path / "tv.pth"))
    assert re.search(r"note: --backbone-weights .*tv\.pth holds a whole network's state_dict \(keys under "
                     r"backbone\.\): its backbone initialised this run's \(not loaded: aux_classifier, classifier\)",
                     capsys.readouterr().err)
    theirs = tv.backbone.state_dict()
    for k, v in net.backbone.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    # a train.py checkpoint ({"model": ...}) of the same network: its backbone, into a network of other classes
    other = train_script.build_model("resnet50", 3, 8, True, True)
    torch.save({"model": net.state_dict(), "iteration": 7}, tmp_path / "last.pt")
    train_script.load_backbone_weights(other, str(tmp_path / "last.pt"))
    assert "initialised this run's (not loaded: classifier)" in capsys.readouterr().err
    ours = net.backbone.state_dict()
    for k, v in other.backbone.state_dict().items():
        assert torch.equal(v, ours[k]), k
    # A whole network of another depth: no note of a load that did not happen, and the hint names the flags its
    # backbone fits
    from model import deeplabv3_resnet

    torch.save(deeplabv3_resnet(29, num_classes=3, width=8).state_dict(), tmp_path / "r29.pth")
    common = ["--crop-size", "32", "--synthetic-train-size", "4", "--synthetic-val-size", "2", "--batch-size", "2",
              "--iterations", "1", "--no-tensorboard", "--device", "cpu", "--out-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as e:
        train_script.main(common + ["--backbone", "resnet50", "--backbone-width", "8", "--backbone-weights",
                                    str(tmp_path / "r29.pth")])
    assert str(e.value).startswith(f"--backbone-weights {tmp_path / 'r29.pth'} does not fit --backbone resnet50 "
                                   "--backbone-width 8; the file holds a --backbone resnet29 --backbone-width 8")
    assert "note: --backbone-weights" not in capsys.readouterr().err


def test_a_jpeg_under_another_extension_is_named_with_a_rename(tmp_path):
    from training import datasets

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.jfif", format="JPEG")
    said = datasets.unread_image_files(str(tmp_path), ["a.jfif"])
    assert said is not None and said.endswith("(a .jfif file is a JPEG or PNG already: rename it)"), said


def test_status_and_progress_lines_come_in_order_through_a_pipe(tmp_path):
    # stdout (status lines: data, trained to ...) was block-buffered through a pipe or file while stderr (progress)
    # was not: a `> log 2>&1` run showed its `data:` line after every progress line, or never, when killed.
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run(
        [sys.executable, "train.py", "--crop-size", "32", "--synthetic-train-size", "8", "--synthetic-val-size", "2",
         "--batch-size", "2", "--iterations", "2", "--log-every", "1", "--no-tensorboard", "--device", "cpu",
         "--preview", "0", "--out-dir", str(tmp_path / "run")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    lines = proc.stdout.splitlines()
    data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
    progress = next(i for i, line in enumerate(lines) if "1/2" in line)
    trained = next(i for i, line in enumerate(lines) if line.startswith("trained to"))
    assert data < progress < trained, lines


def test_deterministic_cuda_training_without_the_fused_ops_is_a_flag_error(monkeypatch, capsys):
    # torch.use_deterministic_algorithms(True) refuses eager's CUDA nll_loss2d and bilinear upsampling backward: the
    # unfused run stopped with a RuntimeError at its first step, after building the data and the model.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    message = _parse_error(["--deterministic"], capsys)
    assert "--deterministic on CUDA trains only with --fused-ops" in message and "--device cpu" in message
    for ok in (["--deterministic", "--fused-ops"], ["--deterministic", "--device", "cpu"]):
        train_script.parse_args(ok)


def test_a_voc_or_folder_run_from_random_backbone_weights_says_so(tmp_path, monkeypatch, capsys):
    # The documented VOC command trained ResNet-101 from random weights without a word, where the paper's results
    # (and a user's expectations of the recipe) start from ImageNet weights.
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    root = _gray_folder(tmp_path / "data", ["background", "cat"], 4, (34, 36), ".png")
    (root / "val.txt").write_text("im3\n")
    common = ["--dataset", "folder", "--data-root", str(root), "--crop-size", "32", "--batch-size", "2",
              "--iterations", "1", "--device", "cpu", "--no-tensorboard", "--preview", "0", "--eval-every", "0"]
    train_script.main(common + ["--backbone", "resnet50", "--out-dir", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert "note: no --backbone-weights: the resnet50 backbone starts from random weights" in err, err
    # no ImageNet weights exist for a ResNet-29 or another width: nothing to say
    train_script.main(common + ["--backbone", "resnet29", "--out-dir", str(tmp_path / "b")])
    assert "--backbone-weights" not in capsys.readouterr().err


def test_python_m_train_names_itself_in_its_usage(tmp_path):
    # A regular install runs the module (python -m train): its usage line said train.py, a file the user does not
    # have.
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: python -m train "), proc.stdout[:200]
    assert "python -m train ..." in proc.stdout

"""train.py and a run's folder: a resume whose model flags differ from the checkpoint's, a new run into a folder
that holds an earlier one (--overwrite), the note that names the settings a resume changes, the NaN-loss message's
advice, and --eval-only's errors about what it read from the checkpoint."""

import json
import os

import numpy as np
import pytest
import torch
from test_training_loop import TinySeg, _cfg, _tiny_build_model, _train_set

import train as train_script
from training import checkpoint as ckpt_io
from training import loop

CPU = torch.device("cpu")
# The real DeepLabV3 at its smallest (ResNet-29 of width 4), so that model flags change its weights' keys and shapes.
SMALL = ["--crop-size", "32", "--synthetic-train-size", "4", "--synthetic-val-size", "2", "--batch-size", "2",
         "--backbone", "resnet29", "--backbone-width", "4", "--no-tensorboard", "--device", "cpu", "--preview", "0",
         "--log-every", "1"]


def _exit_message(argv) -> str:
    with pytest.raises(SystemExit) as e:
        train_script.main(argv)
    return str(e.value.code)


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        train_script.main(argv)
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    return last[last.index("error: "):]  # after the program's name (train.py, or pytest's)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A finished 2-iteration run of the small DeepLabV3: its folder."""
    out = tmp_path_factory.mktemp("small") / "run"
    train_script.main(SMALL + ["--iterations", "2", "--out-dir", str(out)])
    return out


# ---- --resume with other model flags ----------------------------------------------------------------------------


@pytest.mark.parametrize("flags, differs", [
    (["--backbone-width", "8"], "--backbone-width 4 (not 8)"),
    (["--backbone", "resnet50"], "--backbone resnet29 (not resnet50)"),
    (["--aux-loss"], "no --aux-loss (but this command gives it)"),
    (["--backbone", "resnet50", "--backbone-width", "8"], "--backbone resnet29 (not resnet50), --backbone-width 4 "
                                                          "(not 8)"),
])
def test_resume_with_other_model_flags_names_them_in_one_line(small_run, flags, differs):
    last = small_run / "last.pt"
    before = last.read_bytes()
    message = _exit_message(SMALL + ["--iterations", "3", "--out-dir", str(small_run), "--resume", *flags])
    # a switch the checkpoint lacks is named too (the remedy said only "--backbone resnet29 --backbone-width 4")
    wanted = "--backbone resnet29 --backbone-width 4" + (", without --aux-loss" if "--aux-loss" in flags else "")
    assert message == (f"--resume: {last} was trained with {differs}: its weights do not fit the network these flags "
                       f"build; resume with the checkpoint's model flags ({wanted}), or start a new run in another "
                       "--out-dir")
    assert last.read_bytes() == before


def test_resume_of_an_aux_loss_run_without_it_and_a_mismatch_no_flag_explains(tmp_path):
    out = tmp_path / "aux"
    train_script.main(SMALL + ["--iterations", "1", "--out-dir", str(out), "--aux-loss"])
    message = _exit_message(SMALL + ["--iterations", "2", "--out-dir", str(out), "--resume"])
    assert message.startswith(f"--resume: {out / 'last.pt'} was trained with --aux-loss (which this command lacks): ")
    assert "(--backbone resnet29 --backbone-width 4 --aux-loss)" in message
    # Saved flags that match the command but weights that do not (a checkpoint edited or written elsewhere): the
    # load error in one line.
    state = torch.load(out / "last.pt", weights_only=False)
    state["args"]["aux_loss"] = False
    torch.save(state, tmp_path / "edited.pt")
    message = _exit_message(SMALL + ["--iterations", "2", "--out-dir", str(tmp_path / "other"), "--resume",
                                     str(tmp_path / "edited.pt")])
    assert message.startswith(f"--resume: {tmp_path / 'edited.pt'} does not fit the network these flags build "
                              "(checkpoint does not match the model (DeepLabV3): 0 missing keys, ")
    assert "aux_loss=True" in message and "\n" not in message


def test_eval_only_and_predict_name_a_checkpoint_whose_weights_do_not_fit(tmp_path, small_run):
    state = torch.load(small_run / "last.pt", weights_only=False)
    state["args"]["backbone_width"] = 8  # its saved flags no longer describe its weights
    torch.save(state, tmp_path / "wrong.pt")
    message = _exit_message(["--eval-only", "--checkpoint", str(tmp_path / "wrong.pt"), "--out-dir",
                             str(tmp_path / "ev"), "--device", "cpu"])
    assert message.startswith(f"--checkpoint {tmp_path / 'wrong.pt'}: its weights do not fit the network its saved "
                              "flags describe (--backbone resnet29 --backbone-width 8): checkpoint does not match the "
                              "model (DeepLabV3): 0 missing keys, 0 unexpected keys, ")
    assert "\n" not in message
    torch.save({"model": state["model"]}, tmp_path / "bare.pt")  # no num_classes: not train.py's
    (tmp_path / "photos").mkdir()
    from PIL import Image

    Image.new("RGB", (20, 18)).save(tmp_path / "photos" / "a.png")
    message = _exit_message(["--predict", str(tmp_path / "photos"), "--checkpoint", str(tmp_path / "bare.pt"),
                             "--out", str(tmp_path / "masks"), "--device", "cpu"])
    assert message.startswith(f"--checkpoint {tmp_path / 'bare.pt'}: has no 'num_classes' entry, so it is not a "
                              "checkpoint train.py wrote")


# ---- a new run into a folder that holds an earlier one ---------------------------------------------------------


TINY = ["--crop-size", "32", "--synthetic-train-size", "8", "--synthetic-val-size", "2", "--batch-size", "2",
        "--no-tensorboard", "--device", "cpu", "--log-every", "1"]


def _records(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_a_new_run_into_a_folder_with_an_earlier_run_is_refused_until_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    out = tmp_path / "run"
    train_script.main(TINY + ["--iterations", "2", "--out-dir", str(out)])
    files = sorted(os.listdir(out))
    assert files == ["best.pt", "last.pt", "metrics.json", "metrics.jsonl", "predictions_val.png"]
    before = {f: (out / f).read_bytes() for f in files}
    capsys.readouterr()
    error = _usage_error(TINY + ["--iterations", "3", "--out-dir", str(out)], capsys)
    assert error == (f"error: --out-dir {out} holds an earlier run (last.pt at iteration 2, best.pt at "
                     "iteration 2, metrics.jsonl, metrics.json, predictions_val.png): add --resume to continue it, "
                     "--overwrite to replace it (its files are removed), or give another --out-dir")
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # nothing replaced, nothing appended
    # The default --out-dir (runs/DATASET, relative to the current folder) too: the README's command run twice.
    monkeypatch.chdir(tmp_path)
    train_script.main(TINY + ["--iterations", "1"])
    assert "runs/synthetic holds an earlier run (last.pt at iteration 1" in _usage_error(TINY + ["--iterations", "1"],
                                                                                          capsys)
    # --resume and --overwrite contradict each other for the run in --out-dir.
    assert _usage_error(TINY + ["--iterations", "3", "--out-dir", str(out), "--resume", "--overwrite"], capsys) == (
        f"error: --overwrite removes the run in --out-dir {out} and --resume continues it: drop one of them")
    # --resume of another folder's checkpoint into it would replace its files too.
    error = _usage_error(TINY + ["--iterations", "3", "--out-dir", str(out), "--resume",
                                 str(tmp_path / "runs" / "synthetic" / "last.pt")], capsys)
    assert "continues a run from another folder, whose saves would replace that run's files" in error
    # --overwrite: the earlier run's files go, and the new run's log holds only its own records.
    (out / "tb").mkdir()
    (out / "tb" / "events.out.tfevents.1.host.1").write_bytes(b"x")
    (out / "metrics_eval.json").write_text("{}")  # an --eval-only result: not the training run's, kept
    train_script.main(TINY + ["--iterations", "1", "--out-dir", str(out), "--overwrite", "--preview", "0"])
    assert f"--overwrite: removed the earlier run's last.pt, best.pt, metrics.jsonl, metrics.json, " \
           f"predictions_val.png, tb/events.out.tfevents.1.host.1 from {out}" in capsys.readouterr().out
    assert [(r["kind"], r["iteration"]) for r in _records(out)] == [("train", 1), ("val", 1)]
    assert ckpt_io.checkpoint_iteration(str(out / "last.pt")) == 1
    assert sorted(os.listdir(out)) == ["best.pt", "last.pt", "metrics.json", "metrics.jsonl", "metrics_eval.json",
                                       "tb"]
    # --resume continues it; --eval-only and --predict write to other files and are not refused.
    train_script.main(TINY + ["--iterations", "2", "--out-dir", str(out), "--resume", "--preview", "0"])
    assert [r["iteration"] for r in _records(out) if r["kind"] == "train"] == [1, 2]
    train_script.main(["--eval-only", "--checkpoint", str(out / "last.pt"), "--out-dir", str(out), "--device", "cpu",
                       "--preview", "0"])


def test_parse_args_does_not_look_at_the_folder(tmp_path, monkeypatch):
    """The folder check is main's: parse_args (called by tools and tests) accepts a folder with a run in it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "synthetic").mkdir(parents=True)
    (tmp_path / "runs" / "synthetic" / "last.pt").write_bytes(b"x")
    assert train_script.parse_args(["--iterations", "3"]).out_dir is None


# ---- the note a resume prints -----------------------------------------------------------------------------------


def test_resume_notes_every_changed_setting_the_checkpoint_records(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    out = tmp_path / "run"
    train_script.main(TINY + ["--iterations", "2", "--out-dir", str(out), "--stop-after", "1", "--preview", "0"])
    capsys.readouterr()
    train_script.main(["--crop-size", "48", "--synthetic-train-size", "8", "--synthetic-val-size", "2",
                       "--batch-size", "4", "--seed", "3", "--no-flip", "--no-tensorboard", "--device", "cpu",
                       "--log-every", "2", "--iterations", "2", "--out-dir", str(out), "--resume", "--preview", "0",
                       "--workers", "0"])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: changed since the checkpoint's run: --batch-size 2 -> 4, --crop-size 32 -> 48, "
                     "--no-flip off -> on, --seed 0 -> 3; the run continues with the new values (a resume repeats an "
                     "uninterrupted run only with the same ones)"]
    # The same settings: no note.
    train_script.main(TINY + ["--iterations", "3", "--out-dir", str(out), "--resume", "--preview", "0",
                              "--crop-size", "48", "--batch-size", "4", "--seed", "3", "--no-flip"])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: changed since the checkpoint's run: --iterations 2 -> 3; the run continues with the new "
                     "values (a resume repeats an uninterrupted run only with the same ones); from iteration 2 on, "
                     "the learning rate follows the poly schedule of --lr 0.05 over --iterations 3"]


def test_resume_alone_continues_the_run_it_names(tmp_path, monkeypatch, capsys):
    """`--resume` without the run's flags continues that run (its data, schedule and evaluation settings, read from
    the checkpoint), not a run of the presets' values: a VOC run resumed without --dataset went on training on the
    synthetic set, and a short run resumed without --iterations became a 4000-step one, with only a note."""
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    run = TINY + ["--iterations", "3", "--lr", "0.02", "--eval-scales", "1.0,0.75", "--preview", "0"]
    train_script.main(run + ["--out-dir", str(tmp_path / "whole")])
    train_script.main(run + ["--out-dir", str(tmp_path / "part"), "--stop-after", "1"])
    capsys.readouterr()
    train_script.main(["--resume", "--out-dir", str(tmp_path / "part"), "--device", "cpu", "--no-tensorboard",
                       "--preview", "0", "--log-every", "1"])
    printed = capsys.readouterr().out
    assert "trained to iteration 3/3 in " in printed and "s (this invocation, resumed at iteration 1)" in printed
    notes = [line for line in printed.splitlines() if line.startswith("note:")]
    assert notes == ["note: flags not given, read from the checkpoint's run: --synthetic-train-size 8, "
                     "--synthetic-val-size 2, --iterations 3, --batch-size 2, --crop-size 32, --lr 0.02, "
                     "--eval-scales 1.0,0.75"], notes
    timeless = [[{k: v for k, v in r.items() if not k.endswith("_s")} for r in _records(tmp_path / run)]
                for run in ("part", "whole")]
    assert timeless[0] == timeless[1]
    # metrics.json's train_seconds is the last invocation's, which started at resumed_at
    assert [json.load(open(tmp_path / run / "metrics.json"))["resumed_at"] for run in ("part", "whole")] == [1, None]


def test_resume_reads_the_dataset_flags_only_for_the_same_dataset(tmp_path):
    ckpt = tmp_path / "last.pt"
    torch.save({"model": {}, "iteration": 2, "args": {
        "dataset": "voc", "data_root": str(tmp_path / "voc"), "val_split": "val", "train_split": "train_aug",
        "iterations": 6, "lr": 0.007, "batch_size": 4, "fused_ops": True, "log_every": 5, "amp": "fp16"}}, ckpt)
    (tmp_path / "other").mkdir()
    for given, dataset_flags in ((["--dataset", "folder", "--data-root", str(tmp_path / "other")], False),
                                 ([], True)):
        argv = ["--resume", str(ckpt), "--out-dir", str(tmp_path / "run"), *given]
        args = train_script.parse_args(argv)
        path, _, restored = train_script.restore_run_flags(args, train_script.given_flags(argv), CPU)
        assert path == str(ckpt)
        # the schedule is the run's; switches (--fused-ops) and operational flags (--log-every) are as given, and
        # fp16 autocast (a GPU run's) on a CPU too
        assert (args.iterations, args.lr, args.batch_size, args.fused_ops, args.log_every, args.amp) == (
            6, 0.007, 4, False, 20, "none")
        if dataset_flags:
            assert (args.dataset, args.data_root, args.val_split) == ("voc", str(tmp_path / "voc"), "val")
            # (named: those the presets of the run's dataset would have set otherwise: VOC's lr is 0.007 too)
            assert restored == ["dataset", "data_root", "train_split", "val_split", "iterations", "batch_size"]
        else:
            assert (args.dataset, args.val_split, args.train_split) == ("folder", None, None)
            assert restored == ["iterations", "batch_size"]  # (the folder preset's lr is 0.007 too)


def test_a_data_root_spelled_otherwise_on_resume_is_no_change():
    saved = {"data_root": "voc", "lr": 0.01}
    args = train_script.argparse.Namespace(data_root=os.path.abspath("voc"), lr=0.01)
    assert train_script.resume_note(saved, args, 1) is None
    args.data_root = os.path.abspath("voc2")
    assert "--data-root voc -> " in train_script.resume_note(saved, args, 1)


def test_eval_only_evaluates_as_the_run_did(tmp_path, monkeypatch, capsys):
    """--eval-only of a run's best.pt reproduces the run's best mIoU: its evaluation scales and output stride are read
    from the checkpoint unless given (they were the presets'), and a run evaluated with flips says to add
    --eval-flip."""
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    out = tmp_path / "run"
    train_script.main(TINY + ["--iterations", "2", "--eval-scales", "0.75,1.0", "--eval-flip", "--preview", "0",
                              "--out-dir", str(out)])
    best = json.load(open(out / "metrics.json"))["best_miou"]
    capsys.readouterr()
    evaluate = ["--eval-only", "--checkpoint", str(out / "best.pt"), "--device", "cpu", "--preview", "0",
                "--out-dir", str(tmp_path / "eval")]
    train_script.main(evaluate)
    assert ("evaluating at --eval-output-stride 8, --eval-scales 0.75,1.0; the run evaluated with --eval-flip: add "
            "it to evaluate as it did") in capsys.readouterr().out
    train_script.main(evaluate + ["--eval-flip"])
    assert "evaluating at --eval-output-stride 8, --eval-scales 0.75,1.0, --eval-flip\n" in capsys.readouterr().out
    assert json.load(open(tmp_path / "eval" / "metrics_eval.json"))["metrics"]["miou"] == pytest.approx(best)
    train_script.main(evaluate + ["--eval-flip", "--eval-scales", "1.0"])
    assert "--eval-scales 1.0, --eval-flip" in capsys.readouterr().out


def test_predict_predicts_as_the_run_evaluated(tmp_path, monkeypatch, capsys):
    """--predict reads the run's evaluation settings from the checkpoint unless given, as --eval-only does (it used
    the training output stride and scale 1.0, so its masks were not the predictions the run's mIoU measured), and
    its first line names them."""
    from PIL import Image
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    out = tmp_path / "run"
    train_script.main(TINY + ["--iterations", "2", "--eval-scales", "0.75,1.0", "--preview", "0",
                              "--out-dir", str(out)])
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (23, 31, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    capsys.readouterr()

    def predict(folder, *flags):
        train_script.main(["--predict", str(photos), "--checkpoint", str(out / "best.pt"), "--device", "cpu",
                           "--out", str(tmp_path / folder), *flags])
        printed = capsys.readouterr().out
        return printed, [np.asarray(Image.open(tmp_path / folder / f"p{i}.png")) for i in range(2)]

    printed, masks = predict("saved")
    assert printed.startswith("predicting at --eval-output-stride 8, --eval-scales 0.75,1.0\n"), printed
    printed, given = predict("given", "--eval-scales", "0.75,1.0")
    assert all(np.array_equal(a, b) for a, b in zip(masks, given, strict=True))
    printed, _ = predict("one", "--eval-scales", "1.0")
    assert printed.startswith("predicting at --eval-output-stride 8, --eval-scales 1.0\n"), printed


def test_out_of_memory_advice_names_the_flags_of_the_command():
    e = MemoryError("no memory")
    base = dict(crop_size=513, batch_size=16, eval_batch_size=1, eval_scales="1.0", out_dir="nowhere")
    ns = train_script.argparse.Namespace
    predict = train_script._out_of_memory_text(ns(**base, predict="photos", eval_only=False), e)
    assert predict == ("train.py: out of memory (MemoryError: no memory) with --eval-scales 1.0; lower the "
                       "--eval-scales (scales below 1 shrink the images the network sees) or the images, or run on a "
                       "GPU (--device cuda)")
    evaluate = train_script._out_of_memory_text(ns(**base, predict=None, eval_only=True), e)
    assert "with --eval-batch-size 1, --eval-scales 1.0; lower --eval-batch-size, the --eval-scales" in evaluate
    assert "--crop-size" not in predict + evaluate and "--batch-size" not in predict
    train = train_script._out_of_memory_text(ns(**base, predict=None, eval_only=False), e)
    assert "with --crop-size 513, --batch-size 16, --eval-batch-size 1, --eval-scales 1.0; lower --crop-size" in train
    assert "the --scale-range MAX, or for the evaluations --eval-batch-size or the --eval-scales" in train
    train = train_script._out_of_memory_text(ns(**base, scale_range=(0.5, 2.0), predict=None, eval_only=False), e)
    assert "--batch-size 16, --scale-range 0.5 2, --eval-batch-size 1" in train


# ---- the NaN-loss message ---------------------------------------------------------------------------------------


def test_nan_loss_advice_is_true_resuming_the_latest_checkpoint_fails_again(tmp_path):
    """A real divergence (lr 1e5): the checkpoint of the iteration before the NaN holds the weights whose forward
    gave it, so resuming from it with a lower lr stops at the same iteration: the message says so and calls no
    checkpoint good; an older one (best.pt) is offered only as one that may predate the divergence."""
    out = str(tmp_path / "run")
    torch.manual_seed(0)
    evals = []

    def val_fn(model):
        evals.append(1)
        return {"miou": 0.5 - 0.01 * len(evals)}  # the first evaluation is the best: best.pt stays at iteration 2

    with pytest.raises(FloatingPointError) as info:
        loop.fit(TinySeg(), _train_set(), _cfg(out_dir=out, checkpoint_every=1, eval_every=2, iterations=30, lr=1e5),
                 CPU, val_fn=val_fn)
    message = str(info.value)
    nan_at = int(message.split(" at iteration ")[1].split(":")[0])
    last, best = os.path.join(out, "last.pt"), os.path.join(out, "best.pt")
    assert nan_at >= 3 and ckpt_io.checkpoint_iteration(last) == nan_at - 1
    assert "good" not in message
    assert (f"Checkpoints: {last} (iteration {nan_at - 1}), {best} (iteration 2). {last} holds the weights this "
            "forward ran: resuming from it repeats this step on the same batch and stops here again, whatever the "
            f"--lr. The older {best} (iteration 2) may predate the divergence, or already hold diverging weights") in \
        message
    assert message.endswith("start the run again with a lower --lr (train.py --overwrite replaces this run; or give "
                            "another --out-dir), or check the data.")  # (no fp16 advice: the run did not use it)
    # What the message says of last.pt is so: resumed with a 10^5 times lower lr, the same iteration's loss is NaN.
    with pytest.raises(FloatingPointError, match=f"loss is nan at iteration {nan_at}: "):
        loop.fit(TinySeg(), _train_set(), _cfg(out_dir=out, iterations=30, lr=1.0), CPU,
                 resume=ckpt_io.load_checkpoint(last))


def test_nan_loss_message_without_checkpoints_or_with_an_older_one():
    none = loop.nonfinite_loss_message(float("nan"), 5, {}, resumed_at=4)
    assert "No checkpoint was written by this run (the checkpoint it resumed from, at iteration 4, holds the " \
           "weights this forward ran, is unchanged); start the run again with a lower --lr" in none
    older = loop.nonfinite_loss_message(float("inf"), 700, {"r/last.pt": 500, "r/best.pt": None})
    assert "Checkpoints: r/last.pt (iteration 500), r/best.pt (unreadable). The most recent r/last.pt (iteration " \
           "500) may predate the divergence, or already hold diverging weights" in older
    assert "holds the weights this forward ran" not in older and "good" not in older
    assert older.endswith(", or check the data.") and none.endswith(", or check the data.")
    assert loop.nonfinite_loss_message(float("nan"), 5, {}, amp="fp16").endswith(
        ", or check the data (--amp fp16 may overflow: try bf16 or none).")


def test_train_py_nan_loss_is_one_line_naming_the_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    out = tmp_path / "run"
    message = _exit_message(TINY + ["--iterations", "30", "--lr", "1e5", "--checkpoint-every", "1", "--out-dir",
                                    str(out)])
    assert message.startswith("train.py: loss is nan at iteration ") and "\n" not in message
    assert f"Checkpoints: {out / 'last.pt'} (iteration " in message and "good" not in message


# ---- --eval-only: dataset flags read from the checkpoint --------------------------------------------------------


def test_eval_only_says_a_relative_data_root_came_from_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    torch.save({"model": TinySeg(3).state_dict(), "num_classes": 3, "iteration": 2,
                "args": {"dataset": "folder", "data_root": "d1", "backbone": "resnet29", "output_stride": 8}},
               tmp_path / "best.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    message = _exit_message(["--eval-only", "--checkpoint", str(tmp_path / "best.pt"), "--device", "cpu"])
    assert message == (f"--dataset folder: folder dataset: d1/images does not exist (expected d1/images and d1/masks) "
                       f"(--data-root d1: saved in the checkpoint {tmp_path / 'best.pt'}, read relative to the current "
                       f"folder {elsewhere}; pass --data-root to give the dataset's location)")


@pytest.mark.parametrize("name, says", [
    ("empty.pt", "cannot read checkpoint {p}: the file is empty (0 bytes); saves are atomic"),
    ("junk.pt", "cannot read checkpoint {p} (9 bytes): it is corrupt or truncated, or not a torch.save file ("),
    ("folder", "cannot read checkpoint {p}: this is a folder; give a checkpoint file in it (it holds last.pt)"),
    ("missing.pt", "checkpoint not found: {p} (no such file"),
])
def test_unreadable_checkpoint_files_stop_eval_only_in_one_line(tmp_path, name, says):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "junk.pt").write_bytes(b"not a pt!")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "last.pt").write_bytes(b"x")
    path = tmp_path / name
    message = _exit_message(["--eval-only", "--checkpoint", str(path), "--device", "cpu", "--out-dir",
                             str(tmp_path / "ev")])
    assert message.startswith(f"--checkpoint {path}: " + says.format(p=path)), message
    assert "\n" not in message and "weights_only" not in message


# ---- --resume CKPT into another folder; the log of an interrupted run ------------------------------------------


def test_resume_into_another_folder_brings_the_best_checkpoint_along(tmp_path, monkeypatch, capsys):
    """A run forked with --resume OTHER/last.pt into a fresh --out-dir: the best.pt its metrics name is there too
    (copied), or, where the other folder's best.pt is gone, the best is tracked afresh and written by this run."""
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    real_eval = train_script.run_eval
    src = tmp_path / "src"
    train_script.main(TINY + ["--iterations", "2", "--eval-every", "1", "--out-dir", str(src), "--preview", "0"])
    best_it = ckpt_io.checkpoint_iteration(str(src / "best.pt"))
    # The fork's evaluations never beat the best (mIoU 0: a best must be strictly higher).
    monkeypatch.setattr(train_script, "run_eval", lambda *a, **k: {**real_eval(*a, **k), "miou": 0.0})
    fork = tmp_path / "fork"
    capsys.readouterr()
    train_script.main(TINY + ["--iterations", "3", "--eval-every", "1", "--resume", str(src / "last.pt"),
                              "--out-dir", str(fork), "--preview", "0"])
    assert f"into {fork}" in capsys.readouterr().out
    assert (fork / "best.pt").read_bytes() == (src / "best.pt").read_bytes()
    report = json.load(open(fork / "metrics.json"))
    assert report["best_iteration"] == best_it == ckpt_io.checkpoint_iteration(str(fork / "best.pt"))
    # The other folder's best.pt gone: this run's evaluations decide, and the file it names is in --out-dir.
    (src / "best.pt").unlink()
    fork2 = tmp_path / "fork2"
    train_script.main(TINY + ["--iterations", "3", "--eval-every", "1", "--resume", str(src / "last.pt"),
                              "--out-dir", str(fork2), "--preview", "0"])
    assert "is not there: the best is tracked afresh" in capsys.readouterr().out
    report = json.load(open(fork2 / "metrics.json"))
    assert report["best_iteration"] == 3 == ckpt_io.checkpoint_iteration(str(fork2 / "best.pt"))
    # A best.pt that is there but truncated, or of another iteration, is named as such (it said "is not there")
    (src / "best.pt").write_bytes(b"PK\x03\x04 truncated")
    resume = {"best_metric": 0.5, "best_iteration": best_it}
    train_script.carry_best(str(src / "last.pt"), resume, str(tmp_path / "fork3"), True)
    assert "best.pt, the best checkpoint --resume" in (out := capsys.readouterr().out)
    assert "cannot be read (or records no iteration): the best is tracked afresh" in out
    assert resume["best_metric"] is None and not (tmp_path / "fork3" / "best.pt").exists()
    (src / "best.pt").write_bytes((fork2 / "best.pt").read_bytes())  # iteration 3
    train_script.carry_best(str(src / "last.pt"), {"best_metric": 0.5, "best_iteration": best_it},
                            str(tmp_path / "fork3"), True)
    assert "holds iteration 3: the best is tracked afresh" in capsys.readouterr().out


def test_a_resume_drops_the_records_logged_after_the_checkpoint(tmp_path, monkeypatch):
    """An interrupted run logged iterations after its last checkpoint; the resumed run logs them again: the log
    keeps one record per iteration (and lines that are not records of later iterations)."""
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    out = tmp_path / "run"
    args = TINY + ["--iterations", "4", "--out-dir", str(out), "--preview", "0"]
    train_script.main(args + ["--stop-after", "2"])
    with open(out / "metrics.jsonl", "ab") as f:  # what Ctrl-C at iteration 3, after its record, leaves
        f.write(json.dumps({"kind": "train", "iteration": 3, "loss": 9.9}).encode() + b"\n")
        f.write(b"not json\n")
        f.write(b"not utf-8: \xff\xfe\n")  # (the resume stopped on a UnicodeDecodeError traceback)
        # the zero-filled tail a crash can leave (the file's size written before its data), here over the start of
        # the next record: kept, the resumed run's records followed it on the same line
        f.write(b"\0" * 40 + b"\n" + b"\0" * 12 + json.dumps({"kind": "train", "iteration": 9}).encode() + b"\n")
        f.write(b"\0" * 64)
    train_script.main(args + ["--resume"])
    lines = open(out / "metrics.jsonl", "rb").read().splitlines()
    assert b"not json" in lines and b"not utf-8: \xff\xfe" in lines and not any(b"\0" in line for line in lines)
    records = [json.loads(line) for line in lines if line.startswith(b"{")]
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert all(r.get("loss") != 9.9 for r in records)


def test_preview_columns_line_up_for_images_of_other_sizes(tmp_path):
    """predictions_val.png: every column (image | ground truth | prediction) is as wide as the widest image, so a
    narrower image's ground truth and prediction start where the others' do (they started right after it)."""
    from PIL import Image

    kept = [(torch.zeros(3, 4, 6), torch.ones(4, 6, dtype=torch.long), torch.full((4, 6), 2)),
            (torch.zeros(3, 5, 3), torch.ones(5, 3, dtype=torch.long), torch.full((5, 3), 2))]
    path = tmp_path / "preview.png"
    train_script.save_preview(kept, str(path))
    grid = np.asarray(Image.open(path).convert("RGB"))
    scale = grid.shape[0] // 9
    assert grid.shape[:2] == (9 * scale, 18 * scale)
    cells = grid[::scale, ::scale]
    mask_colour, pred_colour = train_script.colorize(np.array([[1, 2]]))[0]
    for top, height, width in ((0, 4, 6), (4, 5, 3)):
        rows = cells[top:top + height]
        assert (rows[:, 6:6 + width] == mask_colour).all() and (rows[:, 12:12 + width] == pred_colour).all()
        assert (rows[:, 6 + width:12] == 0).all() and (rows[:, 12 + width:] == 0).all()


@pytest.mark.parametrize("flags, says", [
    (["--scale-range", "1e30", "1e30"], "scale 1e+30 makes a 32x32 image 3.2e+31x3.2e+31 pixels, beyond 2147483647 a "
                                       "side"),
    (["--scale-range", "1", "1e300"], "makes a 32x32 image "),
    (["--eval-scales", "1e30"], "scale 1e+30 makes a "),
    # raised in a loader's worker, whose exception's first line is "Caught ScaledImageTooLarge in DataLoader worker"
    (["--scale-range", "1e30", "1e30", "--workers", "1"], "scale 1e+30 makes a 32x32 image 3.2e+31x3.2e+31 pixels"),
])
def test_scales_too_large_for_any_image_are_one_line(tmp_path, monkeypatch, flags, says):
    # The resize's sizes overflowed inside torch: an OverflowError (training) or a TypeError with a page of C++
    # frames (evaluation) instead of the out-of-memory line that a merely large scale gets.
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    message = _exit_message(TINY + ["--iterations", "2", "--out-dir", str(tmp_path / "run"), *flags])
    assert message.startswith("train.py: out of memory (ScaledImageTooLarge: ") and "\n" not in message, message
    assert says in message and f"{flags[0]} " in message and "; lower " in message, message

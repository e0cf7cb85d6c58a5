"""train.py as a demanding user runs it: resumes from checkpoints that cannot continue a run, resumes that would
replace a later checkpoint of the folder, the wording of what a run prints, and the help's --amp."""

import os

import pytest
import torch
from test_training_loop import TinySeg, _tiny_build_model
from test_training_runs import _exit_message, _usage_error

import train as train_script
from training import checkpoint as ckpt_io
from training.metrics import SegmentationMetrics, format_table

TINY = ["--crop-size", "32", "--synthetic-train-size", "8", "--synthetic-val-size", "2", "--batch-size", "2",
        "--no-tensorboard", "--device", "cpu", "--log-every", "1", "--preview", "0"]


def _files(folder) -> dict:
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}


@pytest.fixture
def finished_run(tmp_path, monkeypatch):
    """A finished 2-iteration run of the tiny network in tmp_path/run."""
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    out = tmp_path / "run"
    train_script.main(TINY + ["--iterations", "2", "--out-dir", str(out)])
    return out


@pytest.mark.parametrize("drop", [("optimizer", "scheduler", "rng"), ("iteration", "optimizer", "scheduler", "rng")],
                         ids=["no-optimizer", "no-iteration"])
def test_resume_of_a_checkpoint_that_cannot_continue_a_run_is_refused_before_overwrite_removes_anything(
        tmp_path, finished_run, drop):
    # A checkpoint with the weights and class count but not the training state (an exported or hand-made one): it
    # raised a KeyError traceback ('iteration'), or, with --overwrite, removed the folder's earlier run first and
    # then stopped on a ValueError traceback: the user's last.pt, best.pt and log were gone.
    state = torch.load(finished_run / "last.pt", weights_only=False)
    bare = {k: v for k, v in state.items() if k not in drop}
    (tmp_path / "other").mkdir()
    torch.save(bare, tmp_path / "other" / "bare.pt")
    before = _files(finished_run)
    path = str(tmp_path / "other" / "bare.pt")
    for extra in (["--overwrite"], []):
        out = finished_run if extra else tmp_path / "fresh"
        message = _exit_message(TINY + ["--iterations", "4", "--out-dir", str(out), "--resume", path, *extra])
        assert message.startswith(f"--resume {path}: cannot resume from the checkpoint: it has no "), message
        assert "'optimizer'" in message and "\n" not in message
    assert _files(finished_run) == before
    assert not (tmp_path / "fresh").exists() or not os.listdir(tmp_path / "fresh")


def test_resume_of_a_checkpoint_whose_optimizer_does_not_fit_is_refused_before_overwrite_removes_anything(
        tmp_path, finished_run):
    state = torch.load(finished_run / "last.pt", weights_only=False)
    other = TinySeg(21)
    opt = torch.optim.SGD([{"params": list(other.parameters())[:3]}], lr=0.1, momentum=0.9)
    state["optimizer"] = opt.state_dict()  # one group of 3 parameters: another model's
    path, message = _resume_overwrite(tmp_path, finished_run, state)
    assert message.startswith(f"--resume {path}: the checkpoint's optimizer holds parameter groups of [3] "), message


def _resume_overwrite(tmp_path, finished_run, state) -> tuple[str, str]:
    """(path, message): `state` saved in another folder, resumed into the finished run's folder with --overwrite,
    which must refuse it (the message) and leave the folder's files as they were."""
    (tmp_path / "other").mkdir()
    torch.save(state, tmp_path / "other" / "odd.pt")
    before = _files(finished_run)
    path = str(tmp_path / "other" / "odd.pt")
    message = _exit_message(TINY + ["--iterations", "4", "--out-dir", str(finished_run), "--resume", path,
                                    "--overwrite"])
    assert _files(finished_run) == before
    return path, message


def test_resume_from_an_older_checkpoint_of_the_folder_would_replace_its_later_last_checkpoint(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    out = tmp_path / "run"
    train_script.main(TINY + ["--iterations", "4", "--stop-after", "2", "--out-dir", str(out)])
    ckpt_io.atomic_write(str(out / "early.pt"), lambda f: f.write((out / "last.pt").read_bytes()))
    train_script.main(TINY + ["--iterations", "4", "--out-dir", str(out), "--resume"])
    assert ckpt_io.checkpoint_iteration(str(out / "last.pt")) == 4
    before = _files(out)
    capsys.readouterr()
    error = _usage_error(TINY + ["--iterations", "4", "--out-dir", str(out), "--resume", str(out / "early.pt")],
                         capsys)
    assert error == (f"error: --resume {out / 'early.pt'} (iteration 2) continues the run in --out-dir {out} from "
                     "an earlier point: its saves would replace last.pt at iteration 4 (and the log's records after "
                     "iteration 2); give another --out-dir to branch off there (or move last.pt away to rewind "
                     "this folder), or --resume its last.pt")
    assert _files(out) == before
    # Branching off into another folder works (best.pt comes along), and resuming last.pt itself still does.
    train_script.main(TINY + ["--iterations", "4", "--out-dir", str(tmp_path / "branch"), "--resume",
                              str(out / "early.pt")])
    assert ckpt_io.checkpoint_iteration(str(tmp_path / "branch" / "last.pt")) == 4
    train_script.main(TINY + ["--iterations", "5", "--out-dir", str(out), "--resume", str(out / "last.pt")])
    assert ckpt_io.checkpoint_iteration(str(out / "last.pt")) == 5


def test_a_resume_of_another_class_count_names_the_flag_once(tmp_path, finished_run):
    classes = tmp_path / "data" / "classes.txt"
    classes.parent.mkdir()
    classes.write_text("a\nb\nc\n")
    ckpt = torch.load(finished_run / "last.pt", weights_only=False)
    args = train_script.parse_args(["--dataset", "folder", "--data-root", str(classes.parent)])
    with pytest.raises(SystemExit) as e:
        train_script.check_classes(ckpt, "run/last.pt", ["a", "b", "c"], args, "--resume")
    assert str(e.value.code).startswith("--resume run/last.pt predicts 21 classes, but --dataset folder --data-root ")


def test_a_checkpoint_of_reordered_class_names_is_refused(tmp_path, capsys):
    # Found by a review: only the class count was compared, so a classes.txt with two lines swapped scored, resumed
    # and predicted every class under another's name, silently. The names are in the checkpoint: a reorder of them is
    # refused; other differences (a class renamed) warn, the classes taken by index.
    ckpt = {"num_classes": 3, "class_names": ["background", "red", "green"]}
    args = train_script.parse_args(["--dataset", "folder", "--data-root", str(tmp_path)])
    for command in ("--resume", "--eval-only", "--predict"):
        with pytest.raises(SystemExit) as e:
            train_script.check_classes(ckpt, "run/best.pt", ["background", "green", "red"], args, command)
        assert "was trained on the classes of --dataset folder --data-root" in str(e.value.code)
        assert "in another order (class 1: 'red' there, 'green' here, class 2: 'green' there, 'red' here)" in str(
            e.value.code)
        assert str(e.value.code).endswith("order it was trained with: ['background', 'red', 'green']")
    train_script.check_classes(ckpt, "run/best.pt", ["background", "red", "green"], args, "--resume")
    capsys.readouterr()
    train_script.check_classes(ckpt, "run/best.pt", ["background", "red", "lime"], args, "--eval-only")
    assert capsys.readouterr().err == (
        "warning: --eval-only: --checkpoint run/best.pt was trained on class names that differ from --dataset folder "
        f"--data-root {tmp_path}'s (class 2: 'green' there, 'lime' here); the classes are taken by index, under this "
        "dataset's names\n")
    # NFC and NFD spellings of one name are one name; a checkpoint without names is checked by its count only, one
    # without a count by its names' count
    ckpt["class_names"][1] = "caf\u00e9"
    train_script.check_classes(ckpt, "run/best.pt", ["background", "cafe\u0301", "green"], args, "--eval-only")
    train_script.check_classes({"num_classes": 3}, "run/best.pt", ["x", "y", "z"], args, "--eval-only")
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit, match="predicts 2 classes"):
        train_script.check_classes({"class_names": ["a", "b"]}, "run/best.pt", ["x", "y", "z"], args, "--eval-only")


def test_the_table_counts_one_image_in_the_singular():
    m = SegmentationMetrics(2)
    m.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    assert "(dataset-level confusion matrix: 1 image evaluated, 4 pixels counted)" in format_table(m.compute())
    m.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    assert "(dataset-level confusion matrix: 2 images evaluated, 8 pixels counted)" in format_table(m.compute())


def test_help_says_bf16_runs_on_cpu_and_fp16_needs_cuda():
    text = " ".join(train_script.build_parser().format_help().split())
    assert "--amp {none,bf16,fp16} mixed precision: bf16 on CPU or GPU, fp16 on a CUDA device only" in text


# ---- torchrun: the whole network, N processes against one with the global batch ---------------------------------


class _Float64:
    """A training set whose images are float64 (the model runs in float64: rounding out of the comparison)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        image, mask, name = self.dataset[key]
        return image.double(), mask, name


def _deeplab_case(fused: bool, memory_efficient: bool):
    from training import datasets, loop
    from training.transforms import TrainTransform

    torch.manual_seed(0)
    net = train_script.build_model("resnet29", 21, 8, False, fused, memory_efficient, width=4).double()
    data = _Float64(loop.AugmentedDataset(datasets.SyntheticShapes("train", 32, 8, seed=0),
                                          TrainTransform(32, (1.0, 1.0), True)))
    cfg = loop.TrainConfig(iterations=3, batch_size=4, lr=0.05, progress=False, fused_loss=fused)
    return net, data, cfg


def _deeplab_worker(rank, port, fused, memory_efficient, queue):
    import torch.distributed as dist

    from training import distributed, loop

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        net, data, cfg = _deeplab_case(fused, memory_efficient)
        net = torch.nn.parallel.DistributedDataParallel(distributed.convert_sync_batchnorm(net, "cpu"))
        result = loop.fit(net, data, cfg, torch.device("cpu"), rank=rank, world_size=2)
        # numpy arrays: pickled by value (a tensor would be shared through a file descriptor of a process that exits)
        queue.put((rank, result.losses, {k: v.numpy() for k, v in net.module.state_dict().items()}))
    except Exception as e:  # noqa: BLE001 (the test names it)
        queue.put((rank, f"process {rank}: {type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fused, memory_efficient", [(False, False), (True, True)], ids=["eager", "fused-me"])
def test_two_processes_train_train_pys_network_as_one_process_with_the_global_batch_in_float64(
        fused, memory_efficient):
    """docs/training.md: --batch-size is the global batch, BatchNorm synchronized (DistributedBatchNorm2d, or the fused
    ops' process group with the fused ASPP and the fused loss): in float64 two processes compute what one computes
    with the whole batch, up to summation order (the one-process reference is always the eager network)."""
    from helpers import run_two_processes

    from training import loop

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net, data, cfg = _deeplab_case(False, False)
        single = loop.fit(net, data, cfg, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    results = run_two_processes(_deeplab_worker, fused, memory_efficient, timeout=300)
    for rank in (0, 1):
        losses, state = results[rank]
        assert [i for i, _ in losses] == [1, 2, 3]
        for (_, a), (_, b) in zip(losses, single.losses, strict=True):
            assert a == pytest.approx(b, rel=1e-9, abs=0)
        for k, v in net.state_dict().items():
            torch.testing.assert_close(torch.from_numpy(state[k]), v, rtol=1e-7, atol=1e-9, msg=k)


def test_ctrl_c_inside_a_checkpoint_save_keeps_the_previous_checkpoint_loadable(tmp_path, monkeypatch, capsys):
    """Ctrl-C while torch.save writes last.pt (half of the new file written): the previous last.pt stays whole and
    loadable, no temp file is left, and the message names the iteration it holds."""
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(obj.get("iteration"))
        if len(calls) == 2:  # iteration 2's last.pt: half written, then Ctrl-C
            f.write(b"\x80\x02half a checkpoint")
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_io.torch, "save", save)
    with pytest.raises(SystemExit) as stop:
        train_script.main(TINY + ["--iterations", "3", "--checkpoint-every", "1", "--out-dir", str(out)])
    assert stop.value.code == 130 and calls == [1, 2]
    assert f"train.py: interrupted; last.pt (iteration 1) in {out}" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["last.pt", "metrics.jsonl"]
    assert ckpt_io.load_checkpoint(str(out / "last.pt"))["iteration"] == 1
    monkeypatch.setattr(ckpt_io.torch, "save", real_save)
    train_script.main(TINY + ["--iterations", "3", "--out-dir", str(out), "--resume"])
    assert ckpt_io.load_checkpoint(str(out / "last.pt"))["iteration"] == 3


def test_the_network_evaluated_at_another_output_stride_is_channels_last_as_the_trained_one(tmp_path, monkeypatch):
    """With --eval-output-stride other than --output-stride, val_fn evaluates a second network; it was left NCHW
    while the trained network was channels_last (--fused-ops), so evaluation ran its fused kernels in the slower
    layout and converted every input."""
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    layouts = []
    run_eval = train_script.run_eval

    def recording(net, *args, **kwargs):
        weights = [p for p in net.parameters() if p.dim() == 4]
        layouts.append(all(w.is_contiguous(memory_format=torch.channels_last) for w in weights))
        return run_eval(net, *args, **kwargs)

    monkeypatch.setattr(train_script, "run_eval", recording)
    train_script.main(TINY + ["--iterations", "2", "--out-dir", str(tmp_path / "run"), "--fused-ops",
                              "--output-stride", "16", "--eval-output-stride", "8"])
    assert layouts and all(layouts), layouts


def test_an_older_checkpoint_pickled_by_numpy_1_still_loads(tmp_path):
    """Checkpoints written before the numpy random state was kept as a tensor hold a numpy array; pickled under
    numpy 1.x its reconstructor is numpy.core.multiarray._reconstruct, which the weights-only load refused as if the
    file ran code (and checkpoint_iteration read no iteration from it)."""
    import io

    import numpy as np

    state = {"model": {"w": torch.zeros(1)}, "optimizer": {}, "scheduler": {}, "iteration": 1,
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),  # noqa: NPY002
                     "python": (3, (1,) * 625, None)}}
    buf = io.BytesIO()
    torch.save(state, buf, _use_new_zipfile_serialization=False)  # protocol 2: GLOBAL 'module\nname\n' as text
    raw = buf.getvalue()
    assert b"numpy._core.multiarray" in raw
    path = tmp_path / "old.pt"
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))  # as numpy 1.x writes it
    ckpt = ckpt_io.load_checkpoint(str(path))
    ckpt_io.restore_rng_state(ckpt["rng"])
    assert ckpt["iteration"] == 1
    zipped = tmp_path / "old_zip.pt"
    torch.save(state, zipped)
    assert ckpt_io.checkpoint_iteration(str(zipped)) == 1


def test_the_nan_loss_advice_to_resume_an_older_checkpoint_runs_as_written(tmp_path, monkeypatch):
    """A NaN at the step after last.pt was saved: the message said `--resume OUT/best.pt with a lower --lr`, and
    train.py refused exactly that command with the same --out-dir (an older checkpoint of a folder whose last.pt is
    later). The advice names a new folder, and that command runs."""
    from training import loop

    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    out = tmp_path / "run"
    train_script.main(TINY + ["--iterations", "4", "--stop-after", "2", "--out-dir", str(out)])
    early = (out / "last.pt").read_bytes()
    train_script.main(TINY + ["--iterations", "4", "--out-dir", str(out), "--resume"])
    ckpt_io.atomic_write(str(out / "best.pt"), lambda f: f.write(early))  # the evaluation of iteration 2 scored best
    last, best = str(out / "last.pt"), str(out / "best.pt")
    message = loop.nonfinite_loss_message(float("nan"), 5, {last: 4, best: 2})
    assert f"--resume {best} --out-dir NEW_FOLDER (another folder" in message and "with a lower --lr" in message
    train_script.main(TINY + ["--iterations", "6", "--out-dir", str(tmp_path / "new"), "--resume", best,
                              "--lr", "0.001"])
    assert ckpt_io.checkpoint_iteration(str(tmp_path / "new" / "last.pt")) == 6
    # with no later checkpoint, no new folder is needed
    assert "NEW_FOLDER" not in loop.nonfinite_loss_message(float("nan"), 5, {best: 2})


# ---- a new user's review, 2026-12-04 --------------------------------------------------------------------------------

def test_a_tilde_path_gets_the_same_out_dir_protection_as_the_plain_one(tmp_path, monkeypatch, capsys):
    # "--resume=~/B/best.pt" (the shell leaves ~ unexpanded after "="): model.load_file read it from the home folder,
    # but the out-dir checks compared the path as typed, so the resume of an older checkpoint ran and replaced the
    # folder's later last.pt (and best.pt), which the plain path refuses.
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "B"
    train_script.main(TINY + ["--iterations", "4", "--stop-after", "2", "--out-dir", str(out)])
    ckpt_io.atomic_write(str(out / "early.pt"), lambda f: f.write((out / "last.pt").read_bytes()))
    train_script.main(TINY + ["--iterations", "4", "--out-dir", str(out), "--resume"])
    before = _files(out)
    capsys.readouterr()
    error = _usage_error(TINY + ["--iterations", "4", "--out-dir", "~/B", "--resume=~/B/early.pt"], capsys)
    assert error.startswith(f"error: --resume {out / 'early.pt'} (iteration 2) continues the run in --out-dir {out} "
                            "from an earlier point"), error
    assert _files(out) == before
    assert train_script.parse_args(["--checkpoint", "~/B/last.pt", "--eval-only"]).checkpoint == str(out / "last.pt")
    (tmp_path / "~literal").mkdir()  # a folder really named "~literal" in the current folder is read as itself
    assert train_script.parse_args(["--out-dir", "~literal"]).out_dir == "~literal"


@pytest.mark.parametrize("extra, message", [
    (["--classes", "missing.txt"], "error: --classes missing.txt: class list not found: missing.txt"),
    (["--classes", "blank.txt"], "error: --classes blank.txt: class list blank.txt: line 2 is blank"),
    (["--dataset", "folder", "--data-root", "nowhere"], "error: --data-root nowhere: no such folder"),
    (["--dataset", "folder"], "error: --dataset folder needs --data-root PATH (or --classes FILE)"),
])
def test_predict_with_a_bad_class_list_is_a_flag_error_before_any_work(tmp_path, finished_run, monkeypatch, capsys,
                                                                        extra, message):
    # a Python traceback (FileNotFoundError / ValueError from read_class_list), after the images were decoded
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blank.txt").write_text("a\n\nb\n")
    (tmp_path / "imgs").mkdir()
    from PIL import Image
    Image.new("RGB", (20, 20)).save(tmp_path / "imgs" / "a.png")
    error = _usage_error(["--predict", "imgs", "--checkpoint", str(finished_run / "last.pt"), "--out", "pq", *extra],
                         capsys)
    assert error.startswith(message), error
    assert not (tmp_path / "pq").exists()


def test_eval_only_checks_its_default_output_folder_before_evaluating(tmp_path, finished_run, monkeypatch, capsys):
    # --eval-only without --out-dir ran the whole evaluation, then stopped on a FileNotFoundError traceback writing
    # runs/DATASET/metrics (its results lost): the default's parent is checked first, as --out-dir is.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("a file where the default output folder goes")
    monkeypatch.setattr(train_script, "cmd_eval_only", lambda *a: pytest.fail("evaluated before the check"))
    error = _usage_error(["--eval-only", "--checkpoint", str(finished_run / "last.pt")], capsys)
    assert error.startswith("error: --eval-only's default --out-dir (runs/DATASET): runs: cannot create the folder"), \
        error


def test_a_failed_checkpoint_write_is_one_line_that_names_the_checkpoints_kept(tmp_path, monkeypatch, capsys):
    # disk full while saving: the atomic save kept the previous last.pt, but the run ended on an OSError traceback
    # that did not say so
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(obj.get("iteration"))
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(out / "last.pt"))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_io.torch, "save", save)
    message = _exit_message(TINY + ["--iterations", "3", "--checkpoint-every", "1", "--out-dir", str(out)])
    assert message == (f"train.py: No space left on device ({out / 'last.pt'}); the checkpoints saved before it are "
                       f"intact: last.pt (iteration 1) in {out} (--resume continues from last.pt)"), message
    assert ckpt_io.load_checkpoint(str(out / "last.pt"))["iteration"] == 1
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_a_resume_without_out_dir_says_where_it_continues(tmp_path, finished_run, monkeypatch, capsys):
    # --resume run/last.pt without --out-dir continues into runs/DATASET (documented), silently: the user looked for
    # the continued run in the checkpoint's folder
    monkeypatch.chdir(tmp_path)
    args = train_script.parse_args(["--resume", str(finished_run / "last.pt")])
    train_script.check_out_dir(args, pytest.fail)
    assert (f"warning: --resume {finished_run / 'last.pt'} continues into the default --out-dir "
            f"{os.path.join('runs', 'synthetic')}, not the checkpoint's folder {finished_run}: give --out-dir "
            f"{finished_run} to continue the run there") in capsys.readouterr().err
    train_script.check_out_dir(train_script.parse_args(["--resume", str(finished_run / "last.pt"), "--out-dir",
                                                        str(finished_run)]), pytest.fail)
    assert "warning" not in capsys.readouterr().err


# ---- a review of train.py's resume, 2026-12-05 ----------------------------------------------------------------------

@pytest.fixture
def folder_run(tmp_path, monkeypatch):
    """A finished 2-iteration run of the tiny network on a 3-class folder dataset at the relative --data-root
    'data' (the current folder: tmp_path), into tmp_path/run."""
    from test_resume_evaluation import _folder

    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    monkeypatch.chdir(tmp_path)
    _folder(tmp_path / "data", bad_val_mask=False)
    train_script.main(["--dataset", "folder", "--data-root", "data", "--crop-size", "32", "--batch-size", "2",
                       "--iterations", "2", "--no-tensorboard", "--device", "cpu", "--preview", "0",
                       "--backbone", "resnet29", "--out-dir", "run"])
    return tmp_path / "run"


def test_a_resume_takes_the_dataset_from_the_checkpoint_before_checking_its_flags(tmp_path, folder_run, capsys):
    """--resume --data-root (the run's folder, or the folder moved) and --resume --val-split were checked against
    the synthetic set, the default, before the checkpoint's dataset was read: '--data-root … is not read by
    --dataset synthetic', and a false 'ignoring it' warning for --val-split, which was then used."""
    capsys.readouterr()
    train_script.main(["--resume", "--out-dir", "run", "--data-root", "data", "--iterations", "3"])
    out, err = capsys.readouterr()
    assert "data: folder train 4 images, val 2 images, 3 classes" in out
    assert "not read" not in err and "ignoring" not in err
    # the folder moved: --data-root NEW alone continues it on the same kind of dataset
    os.rename(tmp_path / "data", tmp_path / "moved")
    train_script.main(["--resume", "--out-dir", "run", "--data-root", "moved", "--iterations", "4"])
    out, err = capsys.readouterr()
    assert "data: folder train 4 images, val 2 images, 3 classes" in out
    assert "note: changed since the checkpoint's run: --data-root data -> moved" in out
    (tmp_path / "moved" / "other.txt").write_text("im4\n")
    train_script.main(["--resume", "--out-dir", "run", "--data-root", "moved", "--val-split", "other",
                       "--iterations", "5"])
    out, err = capsys.readouterr()
    assert "data: folder train 4 images, other 1 images, 3 classes" in out and "ignoring" not in err
    # the flags not given are named against the folder presets (resnet101), not the synthetic set's (resnet29)
    assert "--backbone resnet29" in out.split("note: flags not given, read from the checkpoint's run: ")[1]
    # a synthetic run given a --data-root is still refused, once the checkpoint says it is one
    train_script.main(TINY + ["--iterations", "2", "--out-dir", str(tmp_path / "syn")])
    assert _usage_error(["--resume", "--out-dir", str(tmp_path / "syn"), "--data-root", "moved",
                         "--iterations", "3"], capsys) == \
        "error: --data-root moved is not read by --dataset synthetic: add --dataset folder or --dataset voc"


def test_a_resume_from_another_folder_says_the_relative_data_root_came_from_the_checkpoint(tmp_path, folder_run,
                                                                                             monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ckpt = folder_run / "last.pt"
    message = _exit_message(["--resume", str(ckpt), "--out-dir", str(folder_run), "--iterations", "3"])
    assert message == (f"--dataset folder: folder dataset: data/images does not exist (expected data/images and "
                       f"data/masks) (--data-root data: saved in the checkpoint {ckpt}, read relative to the current "
                       f"folder {elsewhere}; pass --data-root to give the dataset's location)")


def test_a_resume_of_a_freeze_bn_batch_1_run_without_the_switch_says_where_batch_1_came_from(tmp_path, monkeypatch,
                                                                                             capsys):
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    out = tmp_path / "run"
    flags = TINY[:TINY.index("--batch-size")] + TINY[TINY.index("--batch-size") + 2:] + ["--batch-size", "1"]
    train_script.main(flags + ["--iterations", "2", "--freeze-bn", "--out-dir", str(out)])
    message = _exit_message(["--resume", "--out-dir", str(out), "--iterations", "3"])
    assert message.startswith(f"--resume {out / 'last.pt'}: --batch-size 1 comes from the checkpoint's run, which "
                              "trained with --freeze-bn (a switch, which a resume takes from the command line only): "
                              "add --freeze-bn to continue it as it ran, or give --batch-size 2 or more. batch size 1 "
                              "per BatchNorm batch in training")
    train_script.main(["--resume", "--out-dir", str(out), "--iterations", "3", "--freeze-bn"])
    assert ckpt_io.checkpoint_iteration(str(out / "last.pt")) == 3
    # given on the command line, the batch size is the user's: the flag error, before anything is read
    assert _usage_error(["--resume", "--out-dir", str(out), "--iterations", "4", "--batch-size", "1"], capsys) \
        .startswith("error: --batch-size 1: batch size 1 per BatchNorm batch in training")


def test_eval_only_warns_once_about_a_training_split(finished_run, capsys):
    capsys.readouterr()
    train_script.main(["--eval-only", "--checkpoint", str(finished_run / "last.pt"), "--out-dir",
                       str(finished_run.parent / "ev"), "--train-split", "x", "--device", "cpu"])
    err = capsys.readouterr().err
    assert err.count("--train-split") == 1, err


class _FailingFile:
    """A file that takes `limit` bytes, then raises `error` on the next write: a disk filling up, or Ctrl-C."""

    def __init__(self, f, limit: int, error: BaseException) -> None:
        self.f, self.left, self.error = f, limit, error

    def write(self, data) -> int:
        if len(data) > self.left:
            raise self.error
        self.left -= len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


@pytest.mark.parametrize("stop", ["disk-full", "ctrl-c"])
def test_a_save_cut_short_by_a_full_disk_or_ctrl_c_says_so_in_one_line(tmp_path, monkeypatch, capsys, stop):
    """torch.save's zip writer, closing after a failed write, raised a RuntimeError of its own ("unexpected pos ...")
    that hid the write's error: a traceback and status 1 where train.py promises one line (a full disk: what failed
    and that the checkpoints saved before are intact; Ctrl-C: status 130). The previous last.pt stays whole."""
    import errno

    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    out = tmp_path / "run"
    real_save, calls = torch.save, []
    error = OSError(errno.ENOSPC, "No space left on device") if stop == "disk-full" else KeyboardInterrupt()

    def save(obj, f, *args, **kwargs):
        calls.append(obj.get("iteration"))
        return real_save(obj, _FailingFile(f, 2000, error) if len(calls) == 2 else f, *args, **kwargs)

    monkeypatch.setattr(ckpt_io.torch, "save", save)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        train_script.main(TINY + ["--iterations", "3", "--checkpoint-every", "1", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert "Traceback" not in err and calls == [1, 2]
    if stop == "disk-full":
        assert str(exit_.value.code).startswith("train.py: No space left on device (") or str(
            exit_.value.code).startswith("train.py: OSError: [Errno 28] No space left on device"), exit_.value.code
        assert "the checkpoints saved before it are intact: last.pt (iteration 1)" in str(exit_.value.code)
    else:
        assert exit_.value.code == 130 and f"train.py: interrupted; last.pt (iteration 1) in {out}" in err
    assert sorted(os.listdir(out)) == ["last.pt", "metrics.jsonl"]
    assert ckpt_io.load_checkpoint(str(out / "last.pt"))["iteration"] == 1


def test_a_second_run_into_a_folder_a_run_is_training_into_is_refused(tmp_path, monkeypatch, capsys):
    """Two runs started together into one --out-dir both passed its checks (they see files only once a run wrote
    them): the later one's checkpoints replaced the other's and both logged into one metrics.jsonl. The training run
    holds a lock on the folder (flock: dropped by the OS however the process ends; no file added)."""
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    out = tmp_path / "run"
    held = ckpt_io.lock_folder(str(out))  # another run, training there now
    assert held is not None
    try:
        for extra in ([], ["--resume"], ["--overwrite"]):
            error = _usage_error(TINY + ["--iterations", "2", "--out-dir", str(out), *extra], capsys)
            assert error == (f"error: --out-dir {out}: another train.py run is training into it (it holds the "
                             "folder's lock); wait for it to end, or give another --out-dir"), error
        assert os.listdir(out) == []
    finally:
        os.close(held)
    train_script.main(TINY + ["--iterations", "2", "--out-dir", str(out)])  # free again: it runs, and lets go
    assert ckpt_io.load_checkpoint(str(out / "last.pt"))["iteration"] == 2
    again = ckpt_io.lock_folder(str(out))
    assert again is not None
    ckpt_io.unlock_folder(again)
    # A run refused after taking the lock (the folder holds a run; a --resume that names no file) lets go of it,
    # and removes the folder the lock created for it
    _usage_error(TINY + ["--iterations", "2", "--out-dir", str(out)], capsys)
    ckpt_io.unlock_folder(ckpt_io.lock_folder(str(out)))
    with pytest.raises(SystemExit):
        train_script.main(TINY + ["--iterations", "2", "--out-dir", str(tmp_path / "new"), "--resume",
                                  str(tmp_path / "nothing.pt")])
    assert not (tmp_path / "new").exists()


def test_the_out_dir_lock_ends_with_the_main_process_not_with_its_forked_workers(tmp_path):
    """flock belongs to the open file description, which fork shares: a DataLoader worker (forked) kept the folder
    locked after the main process let go of it or died. Forked children close their copy; release unlocks first."""
    out = tmp_path / "run"
    train_script.lock_out_dir(str(out), pytest.fail)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: waits (holding whatever it inherited) until the parent is done
        os.close(write)
        os.read(read, 1)
        os._exit(0)
    try:
        os.close(read)
        train_script.release_out_dir()
        fd = ckpt_io.lock_folder(str(out))  # free, while the child lives
        assert fd is not None
        ckpt_io.unlock_folder(fd)
    finally:
        os.write(write, b"x")
        os.close(write)
        os.waitpid(pid, 0)


def test_resume_overwrite_refusals_that_a_bad_random_state_or_a_link_slipped_past(tmp_path, finished_run, capsys):
    """--resume CKPT --overwrite with a checkpoint whose random state does not restore removed the folder's run, then
    stopped on a traceback (the state is restored only inside fit); a link to the folder's own last.pt passed the
    --resume/--overwrite contradiction check, and --overwrite removed the file it names."""
    state = torch.load(finished_run / "last.pt", weights_only=False)
    state["rng"] = dict(state["rng"], torch=torch.zeros(3, dtype=torch.uint8))
    path, message = _resume_overwrite(tmp_path, finished_run, state)
    assert message.startswith(f"--resume {path}: its 'rng' entry is not a random-number state that restores ("), message
    assert "\n" not in message
    before = _files(finished_run)
    os.symlink(finished_run / "last.pt", tmp_path / "link.pt")
    error = _usage_error(TINY + ["--iterations", "4", "--out-dir", str(finished_run), "--resume",
                                 str(tmp_path / "link.pt"), "--overwrite"], capsys)
    assert error.startswith(f"error: --overwrite removes the run in --out-dir {finished_run} and --resume "), error
    assert _files(finished_run) == before


def test_overwrite_refuses_to_remove_a_file_the_run_reads(tmp_path, finished_run, capsys):
    """--overwrite --backbone-weights OUT_DIR/best.pt loaded the weights, then removed the folder's run, best.pt
    included, and the new run's best.pt replaced it: the file the user named as an input was gone, unannounced. A link
    to it is followed; a link in the folder (which --overwrite removes, not what it names) is not an input lost."""
    before = _files(finished_run)
    os.symlink(finished_run / "best.pt", tmp_path / "weights.pt")
    for flag, path in (("--backbone-weights", finished_run / "best.pt"),
                       ("--backbone-weights", tmp_path / "weights.pt"), ("--classes", finished_run / "metrics.json")):
        dataset = ["--dataset", "folder", "--data-root", str(tmp_path)] if flag == "--classes" else []  # (reads it)
        error = _usage_error(TINY + dataset + ["--iterations", "1", "--out-dir", str(finished_run), "--overwrite",
                                               flag, str(path)], capsys)
        name = "metrics.json" if flag == "--classes" else "best.pt"
        assert error == (f"error: {flag} {path} is the earlier run's {name} in --out-dir {finished_run}, which "
                         "--overwrite removes before training: copy it out of the folder first, or give another "
                         "--out-dir"), error
        assert _files(finished_run) == before
    # the folder's best.pt is a link to a file elsewhere: --overwrite would remove the link, not the file, so the run
    # goes on to read it (the tiny test network has no backbone: the load is what stops it)
    (tmp_path / "kept.pt").write_bytes((finished_run / "best.pt").read_bytes())
    os.unlink(finished_run / "best.pt")
    os.symlink(tmp_path / "kept.pt", finished_run / "best.pt")
    message = _exit_message(TINY + ["--iterations", "1", "--out-dir", str(finished_run), "--overwrite",
                                    "--backbone-weights", str(tmp_path / "kept.pt")])
    assert message.startswith(f"--backbone-weights {tmp_path / 'kept.pt'} does not fit "), message
    assert (tmp_path / "kept.pt").read_bytes() == before["best.pt"]


def test_a_log_line_cut_off_mid_record_is_dropped_on_resume(tmp_path, monkeypatch):
    """A crash or a full disk in the middle of appending to metrics.jsonl leaves a last line without its end; the
    resumed run's first record was appended to it, and both lines were lost to a JSON reader."""
    import json

    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    out = tmp_path / "run"
    train_script.main(TINY + ["--iterations", "4", "--stop-after", "2", "--out-dir", str(out)])
    log = out / "metrics.jsonl"
    text = log.read_text()
    log.write_text(text + text.splitlines()[-1][:25])  # a third record, cut off
    train_script.main(TINY + ["--iterations", "4", "--out-dir", str(out), "--resume"])
    records = [json.loads(line) for line in log.read_text().splitlines()]  # every line parses
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]


def test_a_checkpoint_holding_a_numpy_array_is_named_not_called_corrupt(tmp_path):
    """A float64 numpy array in an intact file: 'corrupt or truncated' (numpy's dtype classes are refused by a message
    the weights-only pattern did not know); now what model.load_file says for any other pickled object."""
    import numpy as np

    torch.save({"model": {}, "mean": np.zeros(3)}, tmp_path / "np.pt")
    message = _exit_message(["--eval-only", "--checkpoint", str(tmp_path / "np.pt"), "--device", "cpu"])
    assert "holds a pickled numpy.dtypes.Float64DType" in message and "corrupt" not in message, message


def test_eval_only_records_the_network_and_recipe_it_evaluated(tmp_path, finished_run, capsys):
    """metrics_eval.json's args named the presets' training defaults (4000 iterations, batch 8, lr 0.05, 64 px crops
    for the synthetic set; resnet101 at width 64 for a folder run) beside the metrics of a checkpoint trained
    otherwise: now the checkpoint's model flags and recipe, and the output stride it evaluated at."""
    import json

    saved = torch.load(finished_run / "last.pt", weights_only=False)["args"]
    train_script.main(["--eval-only", "--checkpoint", str(finished_run / "last.pt"), "--device", "cpu",
                       "--out-dir", str(tmp_path / "ev"), "--preview", "0", "--iterations", "5",
                       "--momentum", "0.5", "--synthetic-train-size", "7"])  # (not read)
    record = json.load(open(tmp_path / "ev" / "metrics_eval.json"))
    args = record["args"]
    for key in ("iterations", "batch_size", "crop_size", "lr", "backbone", "backbone_width", "output_stride",
                "synthetic_train_size", "momentum", "weight_decay", "freeze_bn", "scale_range", "train_split"):
        assert args[key] == (list(saved[key]) if isinstance(saved[key], tuple) else saved[key]), key  # (JSON)
    assert args["iterations"] == 2 and args["batch_size"] == 2
    assert args["eval_output_stride"] == record["eval_output_stride"]
    assert args["out_dir"] == str(tmp_path / "ev") and args["preview"] == 0  # this command's own flags


def test_an_eval_only_rerun_without_a_preview_removes_the_replaced_one(tmp_path, finished_run, capsys):
    """Rerun with --preview 0, --eval-only replaced metrics_eval.json and left the earlier evaluation's
    predictions_eval.png beside it: a picture of another checkpoint's predictions."""
    ev = tmp_path / "ev"
    evaluate = ["--eval-only", "--checkpoint", str(finished_run / "last.pt"), "--device", "cpu", "--out-dir", str(ev)]
    train_script.main(evaluate + ["--preview", "2"])
    assert (ev / "predictions_eval.png").is_file()
    capsys.readouterr()
    train_script.main(evaluate + ["--preview", "0"])
    assert not (ev / "predictions_eval.png").exists()
    assert ", and its predictions_eval.png (--preview 0 draws none))" in capsys.readouterr().out
    (ev / "predictions_eval.png").write_bytes(b"the user's")  # no earlier evaluation replaced: a file left alone
    (ev / "metrics_eval.json").unlink()
    train_script.main(evaluate + ["--preview", "0"])
    assert (ev / "predictions_eval.png").read_bytes() == b"the user's"


def test_eval_only_and_predict_folder_mistakes_are_flag_errors(tmp_path, finished_run, monkeypatch, capsys):
    """--eval-only --data-root nowhere and --predict nowhere (or a file) stopped with status 1 and no `error:`,
    unlike every other flag check (status 2, argparse's line)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    ckpt = str(finished_run / "last.pt")
    assert _usage_error(["--eval-only", "--checkpoint", ckpt, "--device", "cpu", "--dataset", "folder",
                         "--data-root", "nowhere"], capsys) == "error: --data-root nowhere: no such folder"
    assert _usage_error(["--predict", "nowhere", "--checkpoint", ckpt, "--device", "cpu"], capsys) == (
        "error: --predict nowhere: no such folder (expected a folder of images)")
    assert _usage_error(["--predict", "afile", "--checkpoint", ckpt, "--device", "cpu"], capsys) == (
        "error: --predict afile: not a folder (expected a folder of images)")


def test_class_list_errors_name_only_the_flags_given():
    """check_classes named `--dataset None` for a --predict given only --classes, and told --eval-only users that
    only --dataset stops the checkpoint's dataset flags being read (--data-root does too)."""
    args = train_script.argparse.Namespace(dataset=None, data_root=None, classes="swapped.txt")
    ckpt = {"num_classes": 3, "class_names": ["background", "square", "disc"]}
    with pytest.raises(SystemExit) as e:
        train_script.check_classes(ckpt, "m.pt", ["background", "disc", "square"], args, "--predict")
    assert "trained on the classes of --classes swapped.txt in another order" in str(e.value.code), e.value.code
    args = train_script.argparse.Namespace(dataset="folder", data_root="d2", classes=None)
    with pytest.raises(SystemExit) as e:
        train_script.check_classes(ckpt, "m.pt", ["a", "b"], args, "--eval-only")
    assert str(e.value.code) == (
        "--eval-only: --checkpoint m.pt predicts 3 classes, but --dataset folder --data-root d2 has 2; use a "
        "checkpoint trained on this dataset, or the dataset flags it was trained with (--eval-only reads them from the "
        "checkpoint where neither --dataset nor --data-root is given)")


def test_predict_writes_no_mask_through_a_link_and_names_what_it_leaves(tmp_path, finished_run, monkeypatch, capsys):
    """--predict wrote a mask through a link in --out into the folder it points to (another run's masks); read a
    12-bit photo's warning out as Python's `file:line: UserWarning` and its source line; skipped images in
    subfolders without a word; and mixed its masks with an earlier run's in --out unsaid."""
    import numpy as np
    from PIL import Image

    from training import datasets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "_WARNED_DARK", [])
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (23, 31, 3), dtype=np.uint8)).save(photos / "one.png")
    Image.fromarray(rng.integers(0, 4000, (20, 24)).astype(np.uint16)).save(photos / "twelve.png")
    Image.fromarray(rng.integers(0, 255, (9, 9, 3), dtype=np.uint8)).save(photos / "more" / "deep.png")
    ckpt = str(finished_run / "last.pt")
    train_script.main(["--predict", "photos", "--checkpoint", ckpt, "--device", "cpu", "--out", "first"])
    err = capsys.readouterr().err
    assert "warning: image photos/twelve.png is a 16-bit grayscale image" in err and "UserWarning" not in err, err
    assert ("warning: --predict photos: 1 of its subfolders (more) holds images, which --predict does not read: it "
            "reads the images of one folder, not its subfolders") in err, err
    first = (tmp_path / "first" / "one.png").read_bytes()
    (tmp_path / "second").mkdir()
    os.symlink(tmp_path / "first" / "one.png", tmp_path / "second" / "one.png")
    Image.open(tmp_path / "first" / "twelve.png").save(tmp_path / "second" / "old.png",
                                                        pnginfo=_predict_mark())  # an earlier run's mask
    train_script.main(["--predict", "photos", "--checkpoint", ckpt, "--device", "cpu", "--out", "second"])
    out = capsys.readouterr().out
    assert (tmp_path / "first" / "one.png").read_bytes() == first
    assert not os.path.islink(tmp_path / "second" / "one.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "second" / "one.png")),
                          np.asarray(Image.open(tmp_path / "first" / "one.png")))
    assert ("note: second also holds 1 mask of an earlier --predict run that this one did not write (e.g. old.png)"
            in out), out
    assert sorted(os.listdir(tmp_path / "second")) == ["old.png", "one.png", "twelve.png"]  # no temporary left
    (photos / "one.png").unlink()
    (photos / "twelve.png").unlink()
    message = _exit_message(["--predict", "photos", "--checkpoint", ckpt, "--device", "cpu", "--out", "third"])
    assert message.endswith("in photos; 1 of its subfolders (more) holds images, which --predict does not read: it "
                            "reads the images of one folder, not its subfolders: give one of them"), message


def _predict_mark():
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(*train_script.PREDICT_MARK)
    return info


def test_a_failed_preview_write_keeps_the_earlier_picture(tmp_path, monkeypatch):
    """save_preview wrote in place: a kill or a full disk mid-write left a truncated PNG where the earlier preview
    was. Now written beside it and renamed over it: the earlier picture stays whole, and no temp file is left."""
    import errno

    from PIL import Image

    kept = [(torch.zeros(3, 8, 8), torch.zeros(8, 8, dtype=torch.long), torch.ones(8, 8, dtype=torch.long))]
    path = tmp_path / "predictions_val.png"
    train_script.save_preview(kept, str(path))
    before = path.read_bytes()

    def full_disk(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OSError):
        train_script.save_preview(kept, str(path))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["predictions_val.png"]


def test_eval_only_writes_its_picture_after_its_metrics(tmp_path, finished_run, monkeypatch, capsys):
    """--eval-only wrote predictions_eval.png before metrics_eval.json: a failure writing the metrics left the new
    checkpoint's picture beside the earlier evaluation's metrics (and with --preview 0, the earlier picture already
    removed), without a word."""
    ev = tmp_path / "ev"
    evaluate = ["--eval-only", "--checkpoint", str(finished_run / "last.pt"), "--device", "cpu", "--out-dir", str(ev)]
    train_script.main(evaluate + ["--preview", "2"])
    before = _files(ev)
    real = train_script.ckpt_io.atomic_write

    def failing(path, write):
        if path.endswith("metrics_eval.json"):
            raise OSError(28, "No space left on device", path)
        return real(path, write)

    monkeypatch.setattr(train_script.ckpt_io, "atomic_write", failing)
    for preview in ("2", "0"):
        with pytest.raises(SystemExit):
            train_script.main(evaluate + ["--preview", preview])
        assert _files(ev) == before, preview

    def failing_picture(path, write):  # the metrics written, the picture not: the earlier one must not stay
        if path.endswith("predictions_eval.png"):
            raise OSError(28, "No space left on device", path)
        return real(path, write)

    monkeypatch.setattr(train_script.ckpt_io, "atomic_write", failing_picture)
    with pytest.raises(SystemExit):
        train_script.main(evaluate + ["--preview", "2"])
    assert sorted(os.listdir(ev)) == ["metrics_eval.json"]


def test_eval_only_flag_errors_are_said_once_per_machine_under_torchrun(tmp_path, finished_run, monkeypatch, capsys):
    """The --eval-only dataset flag error (argparse's usage and error line) was printed by every process of a
    machine under torchrun; the others stop with status 2 in silence, as for the other flag errors."""
    argv = ["--eval-only", "--checkpoint", str(finished_run / "last.pt"), "--device", "cpu", "--dataset", "folder",
            "--data-root", str(tmp_path / "nowhere")]
    monkeypatch.setattr(train_script, "machine_follower", lambda: True)
    with pytest.raises(SystemExit) as e:
        train_script.main(argv)
    assert e.value.code == 2 and capsys.readouterr().err == ""


def test_predict_removes_the_temp_files_a_killed_run_left(tmp_path, finished_run, monkeypatch):
    """A --predict killed while writing a mask left its temp file (.NAME.png.PID.X.tmp) in --out for good."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (12, 10)).save(tmp_path / "photos" / "one.png")
    (tmp_path / "out").mkdir()
    dead = 2**22 + 12345  # above the kernel's pid_max default: no process has it
    (tmp_path / "out" / f".one.png.{dead}.k3x9q_2a.tmp").write_bytes(b"")
    (tmp_path / "out" / f".other.png.{dead}.k3x9q_2a.tmp").write_bytes(b"")  # not one of this run's masks: left
    train_script.main(["--predict", "photos", "--checkpoint", str(finished_run / "last.pt"), "--device", "cpu",
                       "--out", "out"])
    assert sorted(os.listdir(tmp_path / "out")) == [f".other.png.{dead}.k3x9q_2a.tmp", "one.png"]


def test_a_branch_resume_stopped_before_its_first_save_says_how_to_go_on(tmp_path, finished_run, monkeypatch,
                                                                          capsys):
    """A run resumed from another folder's checkpoint and stopped before its first save held only the best.pt it
    carried over: the stop line said "--resume continues from last.pt" (there was none), and the same command was
    refused for the folder's "earlier run". The line now says to run it again with --overwrite, which works."""
    import shutil

    branch = tmp_path / "branch"
    branch.mkdir()
    shutil.copy(finished_run / "best.pt", branch / "best.pt")  # what carry_best copies before the first step
    args = train_script.argparse.Namespace(out_dir=str(branch))
    assert train_script._how_to_go_on(args) == (
        "no last.pt was saved yet: the same command with --overwrite starts this run again")
    other = tmp_path / "other"  # Ctrl-C before the first step of such a run: its stop line

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_script.loop, "fit", interrupted)
    with pytest.raises(SystemExit) as e:
        train_script.main(TINY + ["--iterations", "4", "--resume", str(finished_run / "last.pt"), "--out-dir",
                                  str(other)])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().endswith(
        f"best.pt (iteration 2) in {other}: no last.pt was saved yet: the same command with --overwrite starts this "
        "run again")
    monkeypatch.undo()
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    train_script.main(TINY + ["--iterations", "4", "--resume", str(finished_run / "last.pt"), "--out-dir",
                              str(branch), "--overwrite"])
    assert torch.load(branch / "last.pt", weights_only=False)["iteration"] == 4
    assert train_script._how_to_go_on(args) == "--resume continues from last.pt"


def test_resume_dataset_flag_errors_are_flag_errors(tmp_path, finished_run, capsys):
    """--resume --dataset folder --data-root nowhere stopped with status 1 and no `error:` line, unlike the same
    flags on a new run or with --eval-only (status 2, argparse's line)."""
    error = _usage_error(TINY + ["--iterations", "4", "--out-dir", str(finished_run), "--resume", "--dataset",
                                 "folder", "--data-root", str(tmp_path / "nowhere")], capsys)
    assert error == f"error: --data-root {tmp_path / 'nowhere'}: no such folder"


class _Terminal:
    """stderr as a terminal: the progress bar redraws one line."""

    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return True


@pytest.mark.parametrize("how", ["stop-after", "error"])
def test_a_run_that_stops_before_its_last_iteration_ends_its_progress_line(tmp_path, monkeypatch, how):
    # The bar ended its line only at --iterations: a run stopped by --stop-after, or by an error, left it open, and
    # the next line (trained to ..., the error) was glued to it: "... eta 00:00trained to iteration 2/6".
    import sys

    from training import loop

    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    argv = TINY + ["--iterations", "6", "--out-dir", str(tmp_path / "run")]
    if how == "stop-after":
        train_script.main(argv + ["--stop-after", "2"])
    else:
        real, calls = loop.segmentation_loss, []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("boom")
            return real(*args, **kwargs)

        monkeypatch.setattr(loop, "segmentation_loss", failing)
        with pytest.raises(RuntimeError, match="boom"):
            train_script.main(argv)
    last = terminal.text.rsplit("\r\033[K", 1)[1]
    assert last.startswith("[") and " 2/6 " in last and last.endswith("\n"), repr(terminal.text[-300:])
    assert not loop.Progress.open_line


def test_a_metrics_record_that_cannot_be_written_is_cut_back_off_and_names_the_file(tmp_path, monkeypatch):
    """metrics.jsonl was appended through a buffered file: a full disk left the record cut mid-line, and its OSError
    named no file (train.py printed `OSError: [Errno 28] No space left on device`)."""
    import errno

    from training import loop

    path = str(tmp_path / "metrics.jsonl")
    log = loop.MetricsLog(path)
    log.write({"kind": "train", "iteration": 1, "loss": 0.5})
    before = open(path).read()
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 8:
            return real_write(fd, data[:8])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(loop.os, "write", half_then_full)
    with pytest.raises(OSError) as e:
        log.write({"kind": "train", "iteration": 2, "loss": 0.25})
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, path)
    assert open(path).read() == before


@pytest.mark.parametrize("stop", ["ctrl-c", "disk-full"])
def test_a_predict_stopped_half_way_says_how_many_masks_are_this_runs(tmp_path, finished_run, monkeypatch, capsys,
                                                                      stop):
    """A --predict into a folder of an earlier run's masks, stopped half way (Ctrl-C: no line at all, status 130; a
    full disk: the file alone), left masks of two checkpoints side by side, unsaid. The stop line says how many are
    this run's and how many an earlier run's."""
    import errno

    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (12, 10)).save(tmp_path / "photos" / f"{name}.png")
    ckpt = str(finished_run / "last.pt")
    train_script.main(["--predict", "photos", "--checkpoint", ckpt, "--device", "cpu", "--out", "out"])
    real_save, saved = train_script.save_mask_png, []

    def save_two_then_stop(mask, target):
        if len(saved) == 2:
            raise KeyboardInterrupt if stop == "ctrl-c" else OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)
        saved.append(target)
        return real_save(mask, target)

    monkeypatch.setattr(train_script, "save_mask_png", save_two_then_stop)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        train_script.main(["--predict", "photos", "--checkpoint", ckpt, "--device", "cpu", "--out", "out"])
    note = ("2 of the 4 masks were written to out before it stopped; 2 of the others there are an earlier --predict "
            "run's")
    if stop == "ctrl-c":
        assert exit_.value.code == 130
        assert capsys.readouterr().err.endswith(f"train.py: interrupted; {note}\n")
    else:
        assert exit_.value.code == f"train.py: No space left on device (out{os.sep}c.png); {note}"


def test_a_second_ctrl_c_while_the_stop_is_reported_is_ignored(tmp_path, monkeypatch, capsys):
    """Two Ctrl-C a few milliseconds apart: the second arrived while the first's report read the checkpoints
    (torch.load) and ended train.py with a KeyboardInterrupt traceback, status -2. Signals are ignored while the
    report is written."""
    import signal

    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    out = tmp_path / "run"
    real = train_script._saved_checkpoints

    def second_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    def first_ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_script, "_saved_checkpoints", second_ctrl_c)
    monkeypatch.setattr(train_script.loop, "fit", first_ctrl_c)
    with pytest.raises(SystemExit) as exit_:
        train_script.main(TINY + ["--iterations", "3", "--out-dir", str(out)])
    assert exit_.value.code == 130
    assert "train.py: interrupted; no checkpoint was saved" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("command", ["--eval-only", "--predict"])
def test_a_checkpoint_of_nan_weights_is_refused_for_evaluation_and_prediction(tmp_path, finished_run, monkeypatch,
                                                                              command, capsys):
    """A diverged run's weights (NaN): --eval-only printed an mIoU (argmax of NaN is 0: every pixel background) and
    --predict wrote all-background masks, status 0, without a word."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    state = torch.load(finished_run / "last.pt", weights_only=False)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (12, 10)).save(tmp_path / "photos" / "one.png")
    argv = (["--eval-only", "--out-dir", str(finished_run), "--checkpoint", "nan.pt"] if command == "--eval-only"
            else ["--predict", "photos", "--checkpoint", "nan.pt", "--out", "masks"])
    with pytest.raises(SystemExit) as e:
        train_script.main(argv + ["--device", "cpu"])
    assert str(e.value.code).startswith(f"--checkpoint nan.pt: 1 of its tensors hold NaN or infinite values (e.g. "
                                        f"{name}), so its outputs mean nothing"), e.value.code
    assert not (tmp_path / "masks").exists() and not (finished_run / "metrics_eval.json").exists()


def test_resume_of_a_checkpoint_whose_iteration_is_not_a_count_is_one_line(tmp_path, finished_run):
    state = torch.load(finished_run / "last.pt", weights_only=False)
    state["iteration"] = "2"
    torch.save(state, finished_run / "last.pt")
    with pytest.raises(SystemExit) as e:
        train_script.main(TINY + ["--iterations", "3", "--out-dir", str(finished_run), "--resume"])
    assert "its 'iteration' entry is '2', not a count of iterations (an int >= 0)" in str(e.value.code)


def test_an_eval_preview_that_cannot_be_written_says_what_was(tmp_path, finished_run, monkeypatch):
    """--eval-only whose preview could not be written (a full disk) removed the earlier evaluation's preview, after
    writing the new metrics, and said neither."""
    import errno

    (finished_run / "predictions_eval.png").write_bytes(b"an earlier evaluation's")

    def full(kept, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(train_script, "save_preview", full)
    with pytest.raises(SystemExit) as e:
        train_script.main(["--eval-only", "--out-dir", str(finished_run), "--device", "cpu"])
    assert e.value.code == (
        f"train.py: No space left on device ({finished_run / 'predictions_eval.png'}); the metrics were written to "
        f"{finished_run / 'metrics_eval.json'}, and the earlier predictions_eval.png (of another evaluation) was "
        "removed")
    assert (finished_run / "metrics_eval.json").is_file() and not (finished_run / "predictions_eval.png").exists()


def test_a_photo_gone_while_predict_writes_is_named_as_a_data_file(tmp_path, finished_run, monkeypatch):
    """A photo removed between --predict's first pass and its mask was caught as an OSError (MissingDataFile is a
    FileNotFoundError) and printed with its class name: `MissingDataFile: image file not found: ...`."""
    from PIL import Image

    from training import datasets

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (12, 10)).save(tmp_path / "photos" / f"{name}.png")
    real, calls = datasets.read_image, []

    def gone_on_the_second_pass(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 4:
            raise datasets.MissingDataFile(f"image file not found: {path}")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "read_image", gone_on_the_second_pass)
    with pytest.raises(SystemExit) as e:
        train_script.main(["--predict", "photos", "--checkpoint", str(finished_run / "last.pt"), "--device", "cpu",
                           "--out", "masks"])
    assert str(e.value.code).startswith(f"train.py: image file not found: photos{os.sep}b.png"), e.value.code

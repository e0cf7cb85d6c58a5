"""A user following docs/training.md and going off the path: runs interrupted or stopped where the docs promise
that --resume recovers, and what such a resumed run must give (the same files and results as an uninterrupted
run)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_training_loop import _tiny_build_model

import train as train_script

TINY = ["--crop-size", "32", "--synthetic-train-size", "16", "--synthetic-val-size", "4", "--batch-size", "4",
        "--log-every", "1", "--no-tensorboard", "--device", "cpu", "--preview", "2"]


def _records(path, kind):
    with open(path) as f:
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in map(json.loads, f) if r["kind"] == kind]


def _same_weights(a, b) -> bool:
    a, b = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
    return a["iteration"] == b["iteration"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def _folder(root, bad_val_mask: bool):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        mask = np.full((36, 36), i % 3, np.uint8)
        if i == 5 and bad_val_mask:
            mask[3, 4] = 7
        Image.fromarray(mask, mode="L").save(root / "masks" / f"im{i}.png")
    (root / "val.txt").write_text("im4\nim5\n")
    return str(root)


def test_resume_after_the_final_evaluation_failed_evaluates_and_reports(tmp_path, monkeypatch):
    """The final evaluation stops on a bad validation mask (last.pt is saved before it, "so that an error there
    keeps what was trained"); the user fixes the mask and runs --resume: the evaluation runs, and the folder gets
    best.pt, metrics.json, predictions_val.png and the log's validation record, as an uninterrupted run's. Before
    the fix the resumed run saw nothing left to train and wrote none of them."""
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    common = ["--dataset", "folder", "--crop-size", "32", "--batch-size", "2", "--iterations", "2", "--log-every", "1",
              "--no-tensorboard", "--device", "cpu", "--preview", "1"]
    data = tmp_path / "data"
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="bad mask"):
        train_script.main(common + ["--data-root", _folder(data, bad_val_mask=True), "--out-dir", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "metrics.jsonl"]
    _folder(data, bad_val_mask=False)  # fixed
    train_script.main(common + ["--data-root", str(data), "--out-dir", str(out), "--resume"])
    ref = tmp_path / "ref"
    train_script.main(common + ["--data-root", str(data), "--out-dir", str(ref)])
    for run in (out, ref):
        assert sorted(p.name for p in run.iterdir()) == ["best.pt", "last.pt", "metrics.json", "metrics.jsonl",
                                                         "predictions_val.png"]
    assert json.loads((out / "metrics.json").read_text())["metrics"] == \
        json.loads((ref / "metrics.json").read_text())["metrics"]
    assert _records(out / "metrics.jsonl", "val") == _records(ref / "metrics.jsonl", "val")
    assert len(_records(out / "metrics.jsonl", "val")) == 1
    assert _same_weights(out / "best.pt", ref / "best.pt")
    assert not torch.load(out / "last.pt", weights_only=False).get("eval_pending")


def test_resume_after_an_interrupted_evaluation_runs_it_and_ends_as_an_uninterrupted_run(tmp_path, monkeypatch):
    """Ctrl-C (or kill -9) during an --eval-every evaluation: the resumed run runs that evaluation before its next
    step, so that its best.pt, best metric and log are those of the uninterrupted run (before the fix the
    evaluation was skipped: its record was missing, and best.pt could be replaced by a worse model)."""
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    common = TINY + ["--iterations", "4", "--eval-every", "1"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    train_script.main(common + ["--out-dir", str(ref)])

    real_eval, calls = train_script.run_eval, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the evaluation of iteration 2
            raise KeyboardInterrupt
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(train_script, "run_eval", interrupted)
    with pytest.raises(SystemExit) as e:
        train_script.main(common + ["--out-dir", str(out)])
    assert e.value.code == 130
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["iteration"] == 2
    monkeypatch.setattr(train_script, "run_eval", real_eval)
    train_script.main(common + ["--out-dir", str(out), "--resume"])
    assert _records(out / "metrics.jsonl", "val") == _records(ref / "metrics.jsonl", "val")
    assert [r["iteration"] for r in _records(out / "metrics.jsonl", "val")] == [1, 2, 3, 4]
    assert _records(out / "metrics.jsonl", "train") == _records(ref / "metrics.jsonl", "train")
    for name in ("last.pt", "best.pt"):
        assert _same_weights(out / name, ref / name), name
    a, b = (torch.load(d / "last.pt", weights_only=False) for d in (ref, out))
    assert (a["best_metric"], a["best_iteration"]) == (b["best_metric"], b["best_iteration"])


def test_help_says_what_eval_batch_size_does():
    """--help said evaluation batches are padded; they are not (docs/training.md: each image size goes through the
    network on its own, unpadded, so that the metrics do not depend on --eval-batch-size)."""
    text = " ".join(train_script.build_parser().format_help().split())
    assert "(padded)" not in text
    assert "unpadded: the metrics do not depend on it" in text


def test_a_resume_that_no_longer_evaluates_there_keeps_the_finished_evaluations_record(tmp_path, monkeypatch):
    """Killed after an evaluation finished and logged its record but before last.pt was saved again (still marked
    eval_pending), then resumed with flags that do not evaluate at that iteration (--eval-every changed): the resumed
    run does not run that evaluation again, so the log keeps its record (before: dropped as if it would be rewritten,
    and lost)."""
    from training import checkpoint as ckpt_io

    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    common = TINY + ["--iterations", "4"]
    out = tmp_path / "run"
    real_save = ckpt_io.atomic_save

    def killed_after_the_evaluation(state, path, *args, **kwargs):
        if str(path).endswith("last.pt") and state["iteration"] == 2 and not state["eval_pending"]:
            raise KeyboardInterrupt  # the re-save after the evaluation of iteration 2
        return real_save(state, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_io, "atomic_save", killed_after_the_evaluation)
    with pytest.raises(SystemExit):
        train_script.main(common + ["--eval-every", "1", "--out-dir", str(out)])
    assert torch.load(out / "last.pt", weights_only=False)["eval_pending"]
    assert [r["iteration"] for r in _records(out / "metrics.jsonl", "val")] == [1, 2]
    monkeypatch.setattr(ckpt_io, "atomic_save", real_save)
    train_script.main(common + ["--eval-every", "4", "--out-dir", str(out), "--resume"])
    assert [r["iteration"] for r in _records(out / "metrics.jsonl", "val")] == [1, 2, 4]


def test_resume_of_a_finished_run_whose_metrics_json_failed_writes_it(tmp_path, monkeypatch, capsys):
    """The run's last write, metrics.json, fails (here: a full disk) after last.pt was saved with the evaluation
    done. The error says --resume continues; the resumed run has nothing left to train and writes metrics.json from
    the evaluation its checkpoint records, the same as an uninterrupted run's. Before the fix the checkpoint held no
    results and the resume wrote no metrics.json."""
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    common = TINY + ["--iterations", "2"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    train_script.main(common + ["--out-dir", str(ref)])
    real = train_script.ckpt_io.atomic_write

    def full_disk(path, write):
        if path.endswith("metrics.json"):
            raise OSError(28, "No space left on device", path)
        return real(path, write)

    with monkeypatch.context() as m:
        m.setattr(train_script.ckpt_io, "atomic_write", full_disk)
        with pytest.raises(SystemExit, match=r"metrics\.json\).*--resume continues from last\.pt"):
            train_script.main(common + ["--out-dir", str(out)])
    assert not (out / "metrics.json").exists()
    capsys.readouterr()
    train_script.main(common + ["--out-dir", str(out), "--resume"])
    assert "metrics written to" in capsys.readouterr().out
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (out, ref))
    assert got["metrics"] == want["metrics"]
    assert (got["iteration"], got["resumed_at"], got["best_miou"], got["best_iteration"]) == \
        (2, 2, want["best_miou"], want["best_iteration"])
    assert _records(out / "metrics.jsonl", "val") == _records(ref / "metrics.jsonl", "val")
    assert _same_weights(out / "last.pt", ref / "last.pt")
    assert torch.load(out / "last.pt", weights_only=True)["metrics"]["miou"] == want["metrics"]["miou"]


def test_a_finished_run_resumed_into_another_folder_names_no_preview_it_has_not(tmp_path, monkeypatch):
    # The resume evaluates nothing (the run is finished) and brings last.pt and best.pt, not the preview: its
    # metrics.json named <out>/predictions_val.png, which did not exist.
    monkeypatch.setattr(train_script, "build_model", _tiny_build_model)
    common = TINY + ["--iterations", "2"]
    run, branch = tmp_path / "run", tmp_path / "branch"
    train_script.main(common + ["--out-dir", str(run)])
    assert json.loads((run / "metrics.json").read_text())["preview"] == str(run / "predictions_val.png")
    train_script.main(common + ["--out-dir", str(branch), "--resume", str(run / "last.pt")])
    assert not (branch / "predictions_val.png").exists()
    assert json.loads((branch / "metrics.json").read_text())["preview"] is None

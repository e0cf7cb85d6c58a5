"""predict_probs returns probabilities for any number of passes; num_images counts every
image evaluated; `benchmarks/common.py goals` reads a folder of DATE-CARD-prefixed results (benchmarks/results/)
and prints nothing but its report; train.py turns an allocation that fails (a huge --crop-size) into one line."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import train as train_script
from training import loop
from training.metrics import SegmentationMetrics, format_table

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def _common():
    spec = importlib.util.spec_from_file_location("review_bench_common", ROOT / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Net(nn.Module):
    """A 1x1 conv head returning {"out": logits} at the input size, logits far from probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.conv.weight.normal_(generator=torch.Generator().manual_seed(0)).mul_(5)
            self.conv.bias.copy_(torch.tensor([3.0, -2.0, 0.5, 7.0]))

    def forward(self, x):
        return {"out": self.conv(x)}


# ---- (1) predict_probs: probabilities, whatever the number of scales and flips ------------------------------------


@pytest.mark.parametrize("scales, flip", [((1.0,), False), ((1.0,), True), ((0.5, 1.0), False)])
def test_predict_probs_returns_probabilities_for_one_pass_too(scales, flip):
    net = _Net().eval()
    x = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(1))
    probs = loop.predict_probs(net, x, scales, flip)
    assert probs.shape == (2, 4, 9, 7) and probs.dtype == torch.float32
    assert (probs >= 0).all() and (probs <= 1).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 9, 7))
    if scales == (1.0,) and not flip:  # the one pass: exactly the softmax of the logits
        torch.testing.assert_close(probs, net(x)["out"].softmax(1))


# ---- (2) num_images: every image evaluated --------------------------------------------------------------------


def test_num_images_counts_every_image_and_the_report_says_which_the_per_image_miou_averages():
    m = SegmentationMetrics(3, ["bg", "a", "b"])
    m.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 1], [2, 0]]))
    m.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255))  # every pixel ignore-labelled
    got = m.compute()
    assert got["num_images"] == 2  # was 1: the all-ignored image was not counted as evaluated
    assert got["num_images_per_image_miou"] == 1 and got["num_pixels"] == 4
    table = format_table(got)
    assert "2 images evaluated, 4 pixels counted" in table
    assert "over 1 of the 2 images: 1 has every pixel ignore-labelled and is left out" in table
    # merge_ (the distributed evaluation's all-reduce) keeps both counts
    other = SegmentationMetrics(3, ["bg", "a", "b"])
    other.merge_(m.cm, m.image_miou_sum, m.image_count, m.images_seen)
    assert other.compute()["num_images"] == 2 and other.compute()["num_images_per_image_miou"] == 1


class _Items(torch.utils.data.Dataset):
    """Three evaluation items (image, mask, name); the second one's every pixel is ignore-labelled."""

    def __len__(self):
        return 3

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        mask = torch.randint(0, 2, (8, 8), generator=g)
        if i == 1:
            mask = torch.full((8, 8), 255)
        return torch.randn(3, 8, 8, generator=g), mask, f"im{i}"


def _two_process_eval(rank, port, queue):
    import os

    import torch.distributed as dist
    from test_training_loop import TinySeg

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        metrics, _ = loop.evaluate(TinySeg(2).eval(), _Items(), 2, None, torch.device("cpu"), rank=rank,
                                   world_size=2, progress=False)
        queue.put((rank, metrics["num_images"], metrics["num_images_per_image_miou"]))
    except Exception as e:  # noqa: BLE001 (the message fails the test)
        queue.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


def test_a_distributed_evaluation_counts_every_image_of_every_process():
    from helpers import run_two_processes
    from test_training_loop import TinySeg

    torch.manual_seed(0)
    one, _ = loop.evaluate(TinySeg(2).eval(), _Items(), 2, None, torch.device("cpu"), progress=False)
    assert (one["num_images"], one["num_images_per_image_miou"]) == (3, 2)
    results = run_two_processes(_two_process_eval)
    assert results == {0: [3, 2], 1: [3, 2]}


# ---- (3) goals: the committed results folder, DATE-CARD-NAME files ----------------------------------------------


def test_goals_read_the_committed_date_card_results(capsys):
    common = _common()
    assert common.main(["goals", str(RESULTS)]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    lines = out.out.splitlines()
    assert lines[0] == "read: " + ", ".join(str(RESULTS / f"2026-11-28-h200-{n}.csv")
                                            for n in ("aspp_goal", "train_bench", "train_bench_lean"))
    text = out.out
    assert "ASPP forward + backward vs best eager [2048x33x33 r6/12/18 ->256, bf16, N16, NVIDIA H200]: cuda 2.63x " \
           "vs eager (goal 1.6x) met" in text
    assert "ASPP eval forward vs best eager: no eval_fwd row ran in 2026-11-28-h200-aspp_goal.csv" in text
    assert "training step vs best eager (images/s) [deeplabv3_r50 os16 513x513, bf16, N16, NVIDIA H200]: cuda 0.93x" \
        in text
    assert "cuda-lean memory 0.55x, speed 1.44x vs eager met" in text


def test_goals_prefer_json_report_each_run_and_print_only_the_report(tmp_path):
    for name in ("aspp_goal", "train_bench"):
        shutil.copy(RESULTS / f"2026-11-28-h200-{name}.csv", tmp_path / f"2026-11-28-h200-{name}.csv")
    # a second run, unprefixed, as JSON (gpu_suite.sh's folder), with a CSV beside it that must not be read
    rows = [{"op": "deeplabv3", "provider": p, "mode": "train_step", "dtype": "bf16", "shape": "s", "batch": 2,
             "status": "ok", "median_ms": ms, "gpu": "G", "peak_mem_mb": None} for p, ms in (("eager", 3.0),
                                                                                          ("cuda", 2.0))]
    (tmp_path / "train_bench.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    (tmp_path / "train_bench.csv").write_text("not read\n")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "common.py"), "goals", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    reads = [line for line in lines if line.startswith("read: ")]
    assert reads == [f"read: {tmp_path / 'train_bench.json'}",
                     f"read: {tmp_path / '2026-11-28-h200-aspp_goal.csv'}, "
                     f"{tmp_path / '2026-11-28-h200-train_bench.csv'}"], lines
    assert "training step vs best eager (images/s) [s, bf16, N2, G]: cuda 1.50x vs eager (goal 1.3x) met" in lines
    assert "ASPP train forward vs best eager: no aspp_goal.json" in lines  # the unprefixed run has none
    # every line is the report's: a read line, or a goal's title
    titles = tuple(g[0] for g in _common().GOALS) + ("lean training step",)
    assert all(line.startswith(("read: ", *titles)) for line in lines), lines


def test_goals_report_an_unreadable_number_in_a_csv(tmp_path, capsys):
    text = (RESULTS / "2026-11-28-h200-train_bench.csv").read_text().replace("127.548", "fast")
    (tmp_path / "2026-11-28-h200-train_bench.csv").write_text(text)
    common = _common()
    assert common.main(["goals", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "cannot read 2026-11-28-h200-train_bench.csv: a row's median_ms is not a number ('fast')" in out.out
    assert "Traceback" not in out.err and "median_ms is not a number" in out.err


@pytest.mark.parametrize("value, says", [("0", "0.0, not a finite number > 0"), ("nan", "nan, not a finite number > 0"),
                                         ("-1", "-1.0, not a finite number > 0")])
def test_goals_report_a_time_no_measurement_gives(tmp_path, capsys, value, says):
    # 0 divided by zero (a ZeroDivisionError traceback); NaN and -1 gave verdicts ("nanx ... NOT met", "1.00x")
    text = (RESULTS / "2026-11-28-h200-train_bench.csv").read_text().replace("127.548", value)
    (tmp_path / "2026-11-28-h200-train_bench.csv").write_text(text)
    common = _common()
    assert common.main(["goals", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert f"cannot read 2026-11-28-h200-train_bench.csv: a row's median_ms is {says}" in out.out, out.out
    assert "Traceback" not in out.err
    rows = [{"op": "deeplabv3", "provider": "eager", "mode": "train_step", "dtype": "bf16", "shape": "s", "batch": 2,
             "status": "ok", "median_ms": float(value), "gpu": "G", "peak_mem_mb": None}]
    (tmp_path / "train_bench.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    assert common.main(["goals", str(tmp_path)]) == 1
    assert "train_bench.json: a row's median_ms is " in capsys.readouterr().out


# ---- (4) an allocation that fails: one line, not a traceback ----------------------------------------------------


def test_a_huge_synthetic_crop_is_one_line_not_a_memory_error_traceback(tmp_path):
    with pytest.raises(SystemExit) as e:
        train_script.main(["--crop-size", "1000000", "--out-dir", str(tmp_path / "run"), "--no-tensorboard"])
    message = str(e.value.code)
    assert message.startswith("train.py: out of memory (MemoryError: ") and "--crop-size 1000000" in message
    assert "lower --crop-size" in message
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("command", [["roofline", str(RESULTS / "2026-11-28-h200-aspp_goal.csv")],
                                     ["goals", str(RESULTS)]])
def test_a_reader_that_stops_early_is_not_reported_as_a_bad_results_file(command):
    """`common.py roofline FILE | head -2`: the closed pipe was reported as "roofline: Broken pipe: FILE", as if the
    results file could not be read."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "common.py"), *command], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Broken pipe" not in err and "Traceback" not in err and err == "", err

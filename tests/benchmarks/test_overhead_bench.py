"""benchmarks/overhead_bench.py: a `--device cpu --quick` run (triton in the interpreter), its rows' structure and
the deterministic facts of its census; the census helpers on known ops."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT  # noqa: E402

BENCH_DIR = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import overhead_bench  # noqa: E402

OPS = set(overhead_bench.OPS)
MODES = set(overhead_bench.MODES)
CPU_PROVIDERS = {"eager", "cpu", "reference", "triton"}


@pytest.fixture(autouse=True)
def _restore_global_settings():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    threads = torch.get_num_threads()
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    torch.set_num_threads(threads)


def _read(path: Path) -> list[dict]:
    with path.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == overhead_bench.FIELDS
        return list(reader)


def _num(v: str) -> float:
    return float(v)


def _detail(text: str) -> dict[str, int]:
    """census_detail ("allocs: empty×9, zeros×1; copies: copy_×2") summed per category."""
    sums = {}
    for group in filter(None, text.split("; ")):
        cat, items = group.split(": ", 1)
        sums[cat] = sum(int(item.rsplit("×", 1)[1]) for item in items.split(", "))
    return sums


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    # tests/conftest.py sets TRITON_INTERPRET=1 when no GPU is visible: triton rows run in the interpreter
    out = tmp_path_factory.mktemp("overhead")
    argv = ["--device", "cpu", "--quick", "--threads", "1", "--out", str(out), "--name", "quick"]
    saved_threads = torch.get_num_threads()
    try:
        status = overhead_bench.main(argv)
    finally:
        torch.set_num_threads(saved_threads)
    return status, _read(out / "quick.csv"), (out / "quick.md").read_text()


def test_every_op_backend_and_mode_has_a_row(quick_run):
    status, rows, _ = quick_run
    bad = [(r["op"], r["provider"], r["mode"], r["status"], r["note"]) for r in rows if r["status"] != "ok"]
    assert status == 0 and not bad, bad
    assert {(r["op"], r["provider"], r["mode"]) for r in rows} == {
        (op, p, m) for op in OPS for p in CPU_PROVIDERS for m in MODES
    }
    assert len(rows) == len(OPS) * len(CPU_PROVIDERS) * len(MODES)


def test_rows_hold_times_and_the_machine(quick_run):
    _, rows, md = quick_run
    for r in rows:
        assert 0 < _num(r["host_p20_us"]) <= _num(r["host_us"]) <= _num(r["host_p80_us"]), r
        assert int(r["repeats"]) >= overhead_bench.settings_for(r["provider"], torch.device("cpu"), True).min_repeats
        assert r["wall_us"] == r["gpu_us"] == r["gpu_kernels"] == ""  # CUDA only
        assert r["device"] == "cpu" and r["gpu"].startswith("none (CPU:") and r["torch"] == torch.__version__
        assert r["machine"] and r["git_commit"] and r["time"].endswith("Z")
        assert _num(r["eager_host_us"]) > 0 and _num(r["host_x_eager"]) > 0
        if r["provider"] == "eager":
            assert _num(r["host_x_eager"]) == pytest.approx(1.0)
    assert md.splitlines()[0].startswith("# Host overhead per call")
    assert "python benchmarks/overhead_bench.py --device cpu --quick" in md and "TRITON_INTERPRET=1 " in md
    for op in OPS:  # a summary line per op and mode, a table row per op, mode and provider
        for m in MODES:
            assert md.count(f"\n| {op} | {m} | ") == 1 + len(CPU_PROVIDERS), (op, m)
            assert all(f"\n| {op} | {m} | {p} | " in md for p in CPU_PROVIDERS), (op, m)


def test_census_is_consistent(quick_run):
    _, rows, _ = quick_run
    for r in rows:
        case = (r["op"], r["provider"], r["mode"])
        counts = {c: int(r[c]) for c in overhead_bench.CATEGORIES}  # one profiled call: whole numbers
        assert all(v >= 0 for v in counts.values()), case
        assert sum(counts.values()) == int(r["aten_ops"]), case
        assert int(r["syncs"]) >= 0 and int(r["copy_bytes"]) >= 0, case
        assert (int(r["copy_bytes"]) > 0) <= (counts["copies"] > 0), case
        # the detail lists the same ops, by category: its counts add up to each category's
        for cat, total in counts.items():
            assert _detail(r["census_detail"]).get(cat, 0) == total, (case, cat, r["census_detail"])
        if r["provider"] == "eager":
            assert int(r["deeplab_ops_events"]) == 0 and int(r["bn_stage_calls"]) == 0, case
            assert int(r["aten_ops"]) > 0, case  # at least eager's BatchNorm, ReLU or loss
        else:
            assert int(r["deeplab_ops_events"]) > 0 or r["provider"] == "reference", case


def test_launch_counts(quick_run):
    _, rows, _ = quick_run
    for r in rows:
        case = (r["op"], r["provider"], r["mode"])
        conv = r["op"] != "upsample_cross_entropy"
        if r["provider"] in ("eager", "reference"):
            assert (int(r["conv_calls"]) > 0) == conv, case
        if r["provider"] == "cpu" and conv:
            # ATen/oneDNN convolutions and the C++ BN stage kernels; conv_bn_relu's eval forward folds BatchNorm
            # into the convolution (no stage kernel at all)
            assert int(r["conv_calls"]) > 0, case
            folded = case == ("conv_bn_relu", "cpu", "eval_fwd")
            assert (int(r["bn_stage_calls"]) == 0) == folded, case
        if r["provider"] == "triton":
            assert int(r["triton_launches"]) > 0 and r["triton_by_kernel"], case
            by_kernel = sum(float(item.rsplit("×", 1)[1]) for item in r["triton_by_kernel"].split(", "))
            assert by_kernel == int(r["triton_launches"]), case
            assert r["triton_specializations"] == "", case  # the interpreter compiles nothing
        else:
            assert r["triton_launches"] == "" and r["triton_specializations"] == "", case


def test_eager_sees_the_same_ops_in_fwd_and_bwd(quick_run):
    # forward + backward runs at least the forward's glue plus the backward's
    _, rows, _ = quick_run
    by_case = {(r["op"], r["provider"], r["mode"]): int(r["aten_ops"]) for r in rows}
    for op in OPS:
        assert by_case[(op, "eager", "fwd_bwd")] > by_case[(op, "eager", "train_fwd")]


def test_categories():
    c = overhead_bench.category
    assert [c("aten::empty"), c("aten::new_zeros"), c("aten::zeros_like"), c("aten::empty_strided")] == ["allocs"] * 4
    assert [c("aten::copy_"), c("aten::clone"), c("aten::contiguous"), c("aten::_to_copy")] == ["copies"] * 4
    assert [c("aten::cat"), c("aten::stack")] == ["cat"] * 2
    assert [c("aten::sum"), c("aten::mean"), c("aten::amax")] == ["reductions"] * 3
    assert [c("aten::add_"), c("aten::mul"), c("aten::relu_"), c("aten::threshold_backward")] == ["elementwise"] * 4
    assert [c("aten::view"), c("aten::permute"), c("aten::as_strided"), c("aten::detach")] == ["views"] * 4
    assert [c("aten::native_batch_norm"), c("aten::item")] == ["other"] * 2
    own = overhead_bench.is_own_kernel
    assert own("aten::mkldnn_convolution") and own("aten::convolution_backward") and own("aten::_slow_conv2d_forward")
    assert own("aten::cudnn_convolution") and own("aten::conv2d") and own("deeplab_ops::bn_apply")
    assert not own("aten::copy_") and not own("deeplab_ops::conv_bn_relu_forward")


def test_census_of_a_known_call():
    # permute + contiguous is one copy of the whole tensor; conv2d's nested ops are the conv's own; item is a sync
    x = torch.randn(2, 3, 4, 5)
    w = torch.randn(3, 3, 1, 1)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True) as prof:
        y = x.permute(0, 2, 3, 1).contiguous()
        torch.nn.functional.conv2d(x, w)
        y.sum().item()
    row = overhead_bench.census(prof.events(), 1)
    assert row["copy_bytes"] == x.numel() * 4
    assert row["conv_calls"] == 1 and row["syncs"] == 1 and row["sync_ops"] == "item×1"
    assert row["reductions"] == 1 and row["views"] >= 1 and row["copies"] >= 1
    assert "convolution" not in row["census_detail"]


def test_missing_count_launches_is_a_clear_error(monkeypatch):
    import deeplab_ops.triton

    monkeypatch.delattr(deeplab_ops.triton, "count_launches", raising=False)
    with pytest.raises(RuntimeError, match="count_launches"):
        overhead_bench.count_launches()


def test_machine_name():
    name = overhead_bench.machine_name(torch.device("cpu"))
    assert name and all(ch.isalnum() or ch == "-" for ch in name)

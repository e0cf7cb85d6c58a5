"""benchmarks/overhead_bench.py: a `--device cpu --quick` run (triton in the interpreter), its rows' structure and
the deterministic facts of its census; the census helpers on known ops."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT  # noqa: E402

BENCH_DIR = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import overhead_bench  # noqa: E402

from deeplab_ops.backends import interpreter_active  # noqa: E402

OPS = set(overhead_bench.OPS)
MODES = set(overhead_bench.MODES)
# triton rows on CPU tensors need the interpreter (on a GPU machine the suite leaves it off: no triton rows here)
CPU_PROVIDERS = {"eager", "cpu", "reference"} | ({"triton"} if interpreter_active() else set())


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
    argv = ["--device", "cpu", "--quick", "--threads", "1", "--out", str(out), "--name", "quick",
            "--backends", ",".join(sorted(CPU_PROVIDERS))]
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
    assert "python benchmarks/overhead_bench.py --device cpu --quick" in md
    assert ("TRITON_INTERPRET=1 " in md) == ("triton" in CPU_PROVIDERS)  # the rerun line names what triton needs
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


def test_census_counts_the_copies_that_wait_for_the_device():
    """On CUDA the profiler ties each copy_ to its memcpy: device to host, and host to device from pageable memory
    (CUDA stages it after the stream's work), are syncs; a pinned non-blocking upload and a device copy are not.
    Stand-in events (the CPU has no memcpy)."""
    from types import SimpleNamespace

    cpu, gpu = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def copy(memcpy: str):
        return SimpleNamespace(name="aten::copy_", device_type=cpu, cpu_parent=None, input_shapes=[[4]],
                               input_dtypes=["float"], kernels=[SimpleNamespace(name=memcpy)])

    events = [copy("Memcpy DtoH (Device -> Pageable)"), copy("Memcpy HtoD (Pageable -> Device)"),
              copy("Memcpy HtoD (Pinned -> Device)"), copy("Memcpy DtoD (Device -> Device)"),
              SimpleNamespace(name="Memcpy HtoD (Pinned -> Device)", device_type=gpu, cpu_parent=None, kernels=[])]
    row = overhead_bench.census(events, 1, cuda=True)
    assert row["syncs"] == 2, row
    assert row["sync_ops"] == "DtoH copy_×1, pageable HtoD copy_×1"


def test_missing_count_launches_is_a_clear_error(monkeypatch):
    import deeplab_ops.triton

    monkeypatch.delattr(deeplab_ops.triton, "count_launches", raising=False)
    with pytest.raises(RuntimeError, match="count_launches"):
        overhead_bench.count_launches()


def test_machine_name():
    name = overhead_bench.machine_name(torch.device("cpu"))
    assert name and all(ch.isalnum() or ch == "-" for ch in name)


# ---- first use: the training step's launches and specializations --------------------------------------------------


needs_interpreter = pytest.mark.skipif(
    not interpreter_active(), reason="dry launches skip the Triton interpreter's kernels: CPU tensors under "
                               "TRITON_INTERPRET=1 (where a GPU is visible, the GPU suite measures the real count)")


def _stand_in_step(provider, device, dtype, cfg):
    """A small fused network's training step (conv + BN + ReLU, then ASPP) in place of DeepLabV3: real kernels
    in the interpreter in seconds."""
    from deeplab_ops.nn import FusedASPP, FusedConvBNReLU

    torch.manual_seed(0)
    net = torch.nn.Sequential(FusedConvBNReLU(3, 8, 3, padding=1, backend="triton"),
                              FusedASPP(8, (1, 2), 4, dropout=0.0, backend="triton")).to(device=device, dtype=dtype)
    x = torch.randn(cfg.batch, 3, cfg.size, cfg.size, device=device, dtype=dtype)

    def step():
        for p in net.parameters():
            p.grad = None
        net(x).square().mean().backward()

    return step


@needs_interpreter
def test_dry_launches_count_what_a_real_step_launches(monkeypatch):
    # the same step, its kernels run and skipped: the same launches, by kernel, and the same signatures
    monkeypatch.setattr(overhead_bench, "build_step", _stand_in_step)
    cfg = overhead_bench.StepConfig(size=5, batch=2)
    env = dict.fromkeys(("device", "gpu", "machine", "torch", "triton", "git_commit", "time"), "x")
    cpu = torch.device("cpu")
    real = overhead_bench.run_step("triton", cpu, "fp32", cfg, quick=False, env=env)
    dry = overhead_bench.run_step("triton", cpu, "fp32", cfg, quick=False, env=env, dry=True)
    assert real["status"] == dry["status"] == "ok", (real["note"], dry["note"])
    assert real["triton_launches"] > 0 and real["distinct_kernels"] >= 4  # conv fwd/dgrad/wgrad, BN, ASPP kernels
    for key in ("triton_launches", "triton_by_kernel", "distinct_kernels", "triton_specializations",
                "triton_recompiles", "specializations_from"):
        assert real[key] == dry[key], key
    assert "dry launches" in dry["note"] and "dry launches" not in (real["note"] or "")


class _FakeCount:
    def __init__(self, signatures):
        self.total, self.by_kernel, self.signatures = len(signatures), {"k": len(signatures)}, set(signatures)


@needs_interpreter
def test_specializations_predicted_from_signatures(monkeypatch):
    # with LaunchCount.signatures (helper "launch"'s change), the count is the distinct signatures of the first step,
    # and the second step's new ones are its recompiles; without them, no count and a note saying why
    import contextlib

    monkeypatch.setattr(overhead_bench, "build_step", lambda *a: (lambda: None))
    steps = iter([{"a", "b", "c"}, {"a", "b", "d"}])

    @contextlib.contextmanager
    def fake():
        yield _FakeCount(next(steps))

    monkeypatch.setattr(overhead_bench, "count_launches", fake)
    cfg = overhead_bench.StepConfig(size=33, batch=2)
    env = dict.fromkeys(("device", "gpu", "machine", "torch", "triton", "git_commit", "time"), "x")
    row = overhead_bench.run_step("triton", torch.device("cpu"), "fp32", cfg, quick=False, env=env)
    assert (row["triton_specializations"], row["triton_recompiles"]) == (3, 1), row["note"]
    assert row["specializations_from"] == "launch signatures with sm_90 tuning (predicted)"
    assert "goal <= 40 specializations" in row["note"]
    assert "not resolution" in row["note"]  # the 33x33 crop's caveat

    @contextlib.contextmanager
    def without():
        count = _FakeCount({"a"})
        del count.signatures
        yield count

    monkeypatch.setattr(overhead_bench, "count_launches", without)
    row = overhead_bench.run_step("triton", torch.device("cpu"), "fp32", cfg, quick=True, env=env)
    assert row["status"] == "ok" and row["triton_specializations"] is None and row["distinct_kernels"] == 1
    assert "records no signatures" in row["note"]


@needs_interpreter
def test_the_prediction_counts_what_a_gpus_tuning_compiles():
    """Under the interpreter every launch has one fixed configuration; a GPU compiles each pruned candidate of a new
    tuning key (sm_90's list) and then the winner's: gpu_tuning_compiles makes the signatures say so, and a second
    call adds nothing."""
    import deeplab_ops
    from deeplab_ops.triton import conv_engine
    from deeplab_ops.triton import count_launches as launches

    torch.manual_seed(0)
    x = torch.randn(2, 64, 9, 9).half().contiguous(memory_format=torch.channels_last)
    w, g, b = torch.randn(64, 64, 3, 3).half(), torch.rand(64) + 0.5, torch.randn(64)

    def call():
        deeplab_ops.conv_bn_relu(x, w, g, b, torch.zeros(64), torch.ones(64), padding=2, dilation=2, training=True,
                                 backend="triton")

    def configs(signatures):
        return {dict(s.constexprs).get("BLOCK_N") and tuple(dict(s.constexprs)[k] for k in (
            "BLOCK_H", "BLOCK_W", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")) for s in signatures
            if s.kernel == "conv_fwd"}

    with overhead_bench.dry_launches(), launches() as plain:
        call()
    with overhead_bench.dry_launches(), overhead_bench.gpu_tuning_compiles():
        with launches() as first:
            call()
        with launches() as second:
            call()
    hopper = {(c.kwargs["BLOCK_H"], c.kwargs["BLOCK_W"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
               c.num_stages) for c in conv_engine.HOPPER_GEMM}
    assert len(configs(plain.signatures)) == 1 and not configs(plain.signatures) & hopper  # the interpreter's
    assert len(configs(first.signatures)) >= 2 and configs(first.signatures) <= hopper  # float16: three fit
    assert set(second.signatures) <= set(first.signatures)
    assert (first.total, first.by_kernel) == (plain.total, plain.by_kernel)  # the step's own launches


def test_dry_launches_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(overhead_bench, "_interpreter", lambda: False)
    monkeypatch.setattr(overhead_bench, "build_step", lambda *a: (lambda: None))
    env = dict.fromkeys(("device", "gpu", "machine", "torch", "triton", "git_commit", "time"), "x")
    row = overhead_bench.run_step("triton", torch.device("cpu"), "fp32", overhead_bench.StepConfig(), True, env,
                                  dry=True)
    assert row["status"] == "error" and "TRITON_INTERPRET=1" in row["note"]


@needs_interpreter
def test_r50_step_dry_cpu(tmp_path):
    # the real DeepLabV3-R50 (width 64) at a 33x33 crop, batch 2, its Triton kernels skipped: the launches one
    # training step makes, in seconds (the same counts a 513x513 crop gives: docs/benchmarks.md)
    argv = ["--device", "cpu", "--r50-step", "--dry-launches", "--quick", "--threads", "1", "--out", str(tmp_path),
            "--name", "step"]
    saved_threads = torch.get_num_threads()
    try:
        assert overhead_bench.main(argv) == 0
    finally:
        torch.set_num_threads(saved_threads)
    rows = _read(tmp_path / "step.csv")
    assert [(r["op"], r["provider"], r["mode"], r["status"]) for r in rows] == [
        ("deeplabv3_r50", p, "train_step", "ok") for p in overhead_bench.STEP_PROVIDERS]  # no op rows: step only
    for r in rows:
        by_kernel = {item.rsplit("×", 1)[0]: int(item.rsplit("×", 1)[1]) for item in r["triton_by_kernel"].split(", ")}
        assert sum(by_kernel.values()) == int(r["triton_launches"]) and len(by_kernel) == int(r["distinct_kernels"])
        # every conv of the network runs forward, dgrad and wgrad; BatchNorm's four stages; the ASPP's kernels
        assert by_kernel["conv_fwd"] >= by_kernel["conv_dgrad"] and by_kernel["conv_wgrad"] > 50
        assert {"bn_apply", "bn_finalize", "aspp_branch_fwd", "aspp_project_wgrad"} <= set(by_kernel)
        if r["specializations_from"]:  # LaunchCount.signatures present: a prediction, at least one per kernel
            assert int(r["triton_specializations"]) >= len(by_kernel)
        else:
            assert r["triton_specializations"] == "" and "records no signatures" in r["note"]
    lean, plain = (int(r["triton_launches"]) for r in sorted(rows, key=lambda r: r["provider"], reverse=True))
    assert lean > plain  # memory_efficient recomputes the pre-BN activation in the backward: more forward launches
    md = (tmp_path / "step.md").read_text()
    assert "## First use: one DeepLabV3 training step on triton" in md and "goal <= 40" in md


def test_budget_spent_records_skipped_rows(tmp_path):
    # --budget-s 0: no case starts; each is a skipped row saying why, and the run reports that nothing ran
    argv = ["--device", "cpu", "--ops", "aspp", "--modes", "eval_fwd", "--backends", "cpu", "--budget-s", "0",
            "--out", str(tmp_path), "--name", "b"]
    assert overhead_bench.main(argv) == 1
    rows = _read(tmp_path / "b.csv")
    assert [(r["provider"], r["status"]) for r in rows] == [("eager", "skipped"), ("cpu", "skipped")]
    assert all("time budget of 0 s spent" in r["note"] for r in rows)


@pytest.mark.parametrize("argv, interpreter, message", [
    (["--dry-launches"], True, "argument --dry-launches: needs --r50-step"),
    (["--r50-step", "--dry-launches"], False, "argument --dry-launches: needs the Triton interpreter on CPU tensors "
                                              "(TRITON_INTERPRET=1 and --device cpu); here TRITON_INTERPRET is not 1"),
])
def test_dry_launches_flag_says_what_it_needs(argv, interpreter, message, tmp_path, monkeypatch, capsys):
    # --dry-launches was ignored without --r50-step, and without the interpreter turned into an error row after
    # the run started: a usage error (exit 2) before anything runs
    monkeypatch.setattr(overhead_bench, "_interpreter", lambda: interpreter)
    monkeypatch.setattr(overhead_bench, "run_case", lambda *a, **k: pytest.fail("a case ran"))
    monkeypatch.setattr(overhead_bench, "step_row", lambda *a, **k: pytest.fail("the step ran"))
    with pytest.raises(SystemExit) as e:
        overhead_bench.main(["--device", "cpu", "--quick", "--out", str(tmp_path), *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_r50_step_prints_why_it_was_skipped(tmp_path, monkeypatch, capsys):
    # on CPU without the interpreter the step rows are skipped and the run exits 1: the reason is printed with
    # each row, not only written into the .md file
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    argv = ["--device", "cpu", "--r50-step", "--quick", "--threads", "1", "--out", str(tmp_path), "--name", "s"]
    saved_threads = torch.get_num_threads()
    try:
        assert overhead_bench.main(argv) == 1
    finally:
        torch.set_num_threads(saved_threads)
    out = capsys.readouterr().out
    reason = "skipped: it runs CPU tensors only in the Triton interpreter (TRITON_INTERPRET=1)"
    for provider in overhead_bench.STEP_PROVIDERS:
        assert f"deeplabv3_r50 train_step {provider}: " in out
    assert out.count(reason) == len(overhead_bench.STEP_PROVIDERS), out
    assert [r["status"] for r in _read(tmp_path / "s.csv")] == ["skipped"] * len(overhead_bench.STEP_PROVIDERS)


@pytest.mark.parametrize("argv, interpret, prefixed", [
    (["--r50-step", "--backends", "cpu"], "1", True),  # the first-use step runs triton, whatever --backends says
    (["--ops", "aspp", "--backends", "triton"], "1", True),
    (["--ops", "aspp", "--backends", "cpu"], "1", False),  # no triton: the variable changes nothing
    (["--r50-step"], "0", False),
])
def test_the_rerun_line_names_the_interpreter_triton_ran_in(argv, interpret, prefixed, tmp_path, monkeypatch):
    """The Markdown's rerun line began with TRITON_INTERPRET=1 only when triton was among --backends: the line of
    `TRITON_INTERPRET=1 overhead_bench.py --device cpu --r50-step --backends cpu` left it out, and run as printed
    it skips the step (no interpreter)."""
    import shlex

    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    argv = ["--device", "cpu", "--quick", *argv, "--budget-s", "0", "--out", str(tmp_path), "--name", "r"]
    overhead_bench.main(argv)
    command = " ".join(["python", "benchmarks/overhead_bench.py", *map(shlex.quote, argv)])
    assert f"\n    {'TRITON_INTERPRET=1 ' * prefixed}{command}\n" in (tmp_path / "r.md").read_text()


def test_triton_disk_cache_counts_the_entries_of_the_folder_triton_uses(tmp_path, monkeypatch):
    """The first-use row on a GPU says whether Triton's on-disk cache was empty (a new user's first step) or not (a
    later run's: kernels load from disk): the folder Triton reads ($TRITON_CACHE_DIR) and its entries."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    assert overhead_bench.triton_disk_cache() == (str(tmp_path / "cache"), 0)  # not there yet
    for name in ("a1", "b2"):
        (tmp_path / "cache" / name).mkdir(parents=True)
    (tmp_path / "cache" / "lock").write_text("")
    assert overhead_bench.triton_disk_cache() == (str(tmp_path / "cache"), 2)
    # deeplab_ops' kept tuning winners, in their default folder there: not kernels, counted apart
    from deeplab_ops.triton import launch

    previous = launch.set_tuning_cache("")
    try:
        folder = launch.kept_folder()  # this Triton's and these sources' subfolder
        assert os.path.dirname(folder) == str(tmp_path / "cache" / "deeplab_ops_tuning")
        assert overhead_bench.kept_winners() == (folder, 0)
        os.makedirs(folder)
        os.makedirs(os.path.join(os.path.dirname(folder), "triton-3.0.0-0123456789abcdef"))  # another's: not counted
        for name in ("k1.json", "k2.json", "k3.json.x1y2.tmp"):
            with open(os.path.join(folder, name), "w") as f:
                f.write("{}")
        with open(os.path.join(os.path.dirname(folder), "triton-3.0.0-0123456789abcdef", "k.json"), "w") as f:
            f.write("{}")
        assert overhead_bench.triton_disk_cache() == (str(tmp_path / "cache"), 2)
        assert overhead_bench.kept_winners() == (folder, 2)
        launch.set_tuning_cache("off")
        assert overhead_bench.kept_winners() == (None, 0)
    finally:
        launch.set_tuning_cache(previous)


# ---- the first use's goal verdict and precision; host/eager on every save, its name; the Partial paragraph ---------


_ENV = dict.fromkeys(("device", "gpu", "machine", "torch", "triton", "git_commit", "time"), "x")


@needs_interpreter
@pytest.mark.parametrize("dtype, width, verdict", [
    ("fp32", 64, None),  # the CPU default: not the goal's dtype
    ("fp16", 8, None),  # a stand-in width
    ("fp16", 64, "goal <= 40 specializations per step: met (fp16 standing in for bf16)"),
])
def test_the_first_use_gives_the_goals_verdict_only_for_the_goals_step(dtype, width, verdict, monkeypatch):
    """"goal <= 40 specializations per step: met" was said whatever the step's dtype and width (fp32 on CPU by
    default, --step-width stand-ins); the goal is the full-width step's in bf16 (fp16 standing in under the
    interpreter). Other rows say they are not the goal's and give no verdict."""
    import contextlib

    monkeypatch.setattr(overhead_bench, "build_step", lambda *a: (lambda: None))

    @contextlib.contextmanager
    def fake():
        yield _FakeCount({"a", "b", "c"})

    monkeypatch.setattr(overhead_bench, "count_launches", fake)
    cfg = overhead_bench.StepConfig(width=width, size=33, batch=2)
    row = overhead_bench.run_step("triton", torch.device("cpu"), dtype, cfg, quick=True, env=_ENV)
    assert row["status"] == "ok" and row["triton_specializations"] == 3, row["note"]
    if verdict:
        assert verdict in row["note"], row["note"]
    else:
        assert "goal <= 40 specializations per step: no verdict" in row["note"], row["note"]
        assert "met" not in row["note"].replace("not the goal's", ""), row["note"]
    assert overhead_bench.step_goal(41, "bf16", 64, cuda=True) == "goal <= 40 specializations per step: NOT met"
    assert "no verdict" in overhead_bench.step_goal(3, "fp16", 64, cuda=True)  # on a GPU, bf16 itself


def test_the_gpu_suites_cpu_first_use_predicts_the_goals_dtype(tmp_path):
    """The smoke run's first use ran at the interpreter's default, fp32, whose rows are not the goal's: it runs
    fp16, bf16's stand-in there, so first_use.md gives the goal's verdict (predicted)."""
    from test_benchmarks import _run_suite

    result, calls, _ = _run_suite(tmp_path, gpu=False, BENCH_DEVICE="cpu", SUITE_PHASES="first_use")
    assert result.returncode == 0, result.stdout + result.stderr
    (first_use,) = [c for c in calls if "overhead_bench.py" in c]
    assert "--r50-step --dry-launches --step-dtype fp16 " in first_use, first_use


@pytest.mark.parametrize("dtype, step_dtype, tf32", [("tf32", "fp32", False), ("fp32", "tf32", True)])
def test_the_steps_tf32_follows_the_step_dtype(dtype, step_dtype, tf32, tmp_path, monkeypatch):
    """TF32 was set from --dtype alone: --step-dtype tf32 ran the step with TF32 off, and --dtype tf32 --step-dtype
    fp32 with it on. The step runs under its own dtype's setting; --dtype's is back for the per-op cases after it.
    (tf32 is a CUDA mode, refused with --device cpu: the check is stood down to run the flags here.)"""
    import common

    monkeypatch.setattr(common, "check_dtypes", lambda *a, **k: None)
    seen = []

    def step_row(provider, device, dtype_name, cfg, quick, env, dry=False):
        seen.append((dtype_name, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        op, shape = cfg.label()
        row = dict.fromkeys(overhead_bench.FIELDS)
        row.update(env, op=op, provider=provider, mode="train_step", dtype=dtype_name, shape=shape,
                   batch=cfg.batch, status="skipped", note="stood in")
        return row

    def run_case(op, provider, mode, device, dtype_name, quick, env):
        seen.append((dtype_name, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return {**dict.fromkeys(overhead_bench.FIELDS), **env, "op": op, "provider": provider, "mode": mode,
                "dtype": dtype_name, "status": "skipped", "note": "stood in"}

    monkeypatch.setattr(overhead_bench, "step_row", step_row)
    monkeypatch.setattr(overhead_bench, "run_case", run_case)
    argv = ["--device", "cpu", "--quick", "--r50-step", "--step-providers", "triton", "--dtype", dtype,
            "--step-dtype", step_dtype, "--ops", "aspp", "--modes", "eval_fwd", "--backends", "cpu",
            "--out", str(tmp_path), "--name", "p"]
    overhead_bench.main(argv)
    assert seen[0] == (step_dtype, tf32, tf32), seen  # the step
    assert set(seen[1:]) == {(dtype, not tf32, not tf32)}, seen  # the per-op cases, after it


def test_a_partial_run_fills_host_over_eager(tmp_path, monkeypatch):
    """The files of a run stopped by Ctrl-C (or a timeout) left host_x_eager empty: it was filled at the end only.
    Every save fills it, as the other scripts fill their speedups."""
    calls = []

    def run_case(op, provider, mode, device, dtype_name, quick, env):
        calls.append(provider)
        if len(calls) == 3:
            raise KeyboardInterrupt
        row = {**dict.fromkeys(overhead_bench.FIELDS), **env, "op": op, "provider": provider, "mode": mode,
               "dtype": dtype_name, "status": "ok", "host_us": {"eager": 10.0, "cpu": 25.0}[provider], "aten_ops": 3,
               "views": 1, "syncs": 0, "census_detail": ""}
        return row

    monkeypatch.setattr(overhead_bench, "run_case", run_case)
    argv = ["--device", "cpu", "--quick", "--ops", "aspp", "--modes", "eval_fwd", "--backends", "cpu,reference",
            "--out", str(tmp_path), "--name", "stopped"]
    with pytest.raises(KeyboardInterrupt):
        overhead_bench.main(argv)
    with (tmp_path / "stopped.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "ok", "partial"]
    assert [(r["provider"], r["host_x_eager"]) for r in rows[:2]] == [("eager", "1"), ("cpu", "2.5")]
    md = (tmp_path / "stopped.md").read_text()
    assert "| aspp | eval_fwd | 10 · " in md and " | 25 (2.5) · " in md, md  # the summary's host/eager


def test_overheads_host_over_eager_is_not_named_as_the_other_scripts_speedup(tmp_path):
    """"x eager" headed eager ÷ the row (a speedup) in the aspp / conv / train tables and the row ÷ eager (a cost)
    in overhead_bench's: the same words, opposite meanings. overhead_bench's heading says what it divides (its CSV
    column, host_x_eager, is kept: committed results and readers use it)."""
    import common

    heading = dict(overhead_bench.TABLE)["host_x_eager"]
    assert heading == "host/eager" and heading != dict(common.TABLE_COLUMNS)["speedup_vs_eager"]
    assert "host_x_eager" in overhead_bench.FIELDS
    rows = [{**dict.fromkeys(overhead_bench.FIELDS), **_ENV, "op": "aspp", "mode": "eval_fwd", "provider": p,
             "status": "ok", "host_us": us, "aten_ops": 3, "views": 1, "syncs": 0, "census_detail": ""}
            for p, us in (("eager", 10.0), ("cpu", 25.0))]
    overhead_bench.fill_eager(rows)
    md = overhead_bench.markdown(rows, _ENV, "python x", [])
    assert "| host/eager |" in md and "| x eager |" not in md and "(x eager)" not in md, md
    assert "host µs per call (host/eager: above 1 is slower)" in md and "| 25 (2.5) · 2 (+1) · 0 |" in md, md


def test_the_partial_paragraph_says_the_rows_are_below_it(tmp_path, monkeypatch):
    """The Markdown's **Partial** paragraph sits under the title, above the rows, and said "the rows above"."""
    def run_case(op, provider, mode, device, dtype_name, quick, env):
        raise KeyboardInterrupt

    monkeypatch.setattr(overhead_bench, "run_case", run_case)
    monkeypatch.setattr(overhead_bench, "step_row", lambda provider, device, dtype_name, cfg, quick, env, dry=False: {
        **dict.fromkeys(overhead_bench.FIELDS), **env, "op": "deeplabv3_r50", "provider": provider,
        "mode": "train_step", "dtype": dtype_name, "status": "skipped", "note": "stood in"})
    argv = ["--device", "cpu", "--quick", "--r50-step", "--ops", "aspp", "--backends", "cpu", "--out",
            str(tmp_path), "--name", "p"]
    with pytest.raises(KeyboardInterrupt):
        overhead_bench.main(argv)
    md = (tmp_path / "p.md").read_text()
    assert overhead_bench.PARTIAL_MD in md and "rows below" in overhead_bench.PARTIAL_MD
    assert "rows above" not in md
    assert md.index(overhead_bench.PARTIAL_MD) < md.index("| deeplabv3_r50 |")

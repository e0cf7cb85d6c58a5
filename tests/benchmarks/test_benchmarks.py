"""The benchmark scripts: FLOP counting, the shared helpers, and a `--device cpu --quick` run of each script."""

from __future__ import annotations

import contextlib
import csv
import gc
import importlib.util
import itertools
import json
import math
import os
import re
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from helpers import ROOT  # noqa: E402

BENCH_DIR = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import common  # noqa: E402

# One thread: on a shared CPU machine, oversubscribed OpenMP threads make these runs ten times slower.
QUICK = ["--device", "cpu", "--quick", "--threads", "1"]


# ---- FLOP counting ---------------------------------------------------------------------------------------------


def _brute_taps(h, w, k, d, p, s):
    ho = (h + 2 * p - d * (k - 1) - 1) // s + 1
    wo = (w + 2 * p - d * (k - 1) - 1) // s + 1
    useful = sum(
        0 <= oy * s + i * d - p < h and 0 <= ox * s + j * d - p < w
        for i, j, oy, ox in itertools.product(range(k), range(k), range(ho), range(wo))
    )
    return useful, k * k * ho * wo


@pytest.mark.parametrize(("size", "rates", "design"), [
    (33, (6, 12, 18), (0.77, 0.57, 0.41)),   # benchmarks/results/README.md, output stride 16
    (33, (12, 24, 36), (0.57, 0.27, 0.11)),  # the 12/24/36 figures at 33x33
    (65, (12, 24, 36), (0.77, 0.57, 0.40)),  # output stride 8: the feature map is 65x65
])
def test_valid_tap_fraction(size, rates, design):
    for r, expected in zip(rates, design, strict=True):
        # per axis, the centre tap reads size positions, each side tap max(0, size - r): the fraction is separable
        exact = ((size + 2 * max(0, size - r)) / (3 * size)) ** 2
        got = common.valid_tap_fraction(size, r)
        assert got == pytest.approx(exact, rel=1e-12)
        # the two-digit figures of the design notes; rate 18 at 33x33 is (63/99)^2 = 0.40496, given as 0.41
        assert abs(got - expected) < 0.006, f"{size}x{size} rate {r}: {got:.4f}, expected about {expected}"


def test_conv_taps_matches_brute_force():
    for h, w, k, d, p, s in itertools.product((5, 9), (7, 12), (1, 3), (1, 2, 5), (0, 1, 5), (1, 2, 3)):
        if h + 2 * p - d * (k - 1) - 1 < 0 or w + 2 * p - d * (k - 1) - 1 < 0:
            continue
        assert common.conv_taps(h, w, k, d, p, s) == _brute_taps(h, w, k, d, p, s), (h, w, k, d, p, s)


def test_rate_beyond_image_leaves_only_the_centre_tap():
    assert common.conv_taps(33, 33, 3, 40, 40) == (33 * 33, 9 * 33 * 33)


def test_aspp_flops():
    n, cin, cout, size, rates = 2, 2048, 256, 33, (6, 12, 18)
    useful, dense = common.aspp_flops(n, cin, cout, size, size, rates)
    hw = size * size
    conv3_dense = 3 * 2.0 * n * cin * cout * 9 * hw
    conv3_useful = sum(2.0 * n * cin * cout * 9 * hw * common.valid_tap_fraction(size, r) for r in rates)
    assert math.isclose(dense - useful, conv3_dense - conv3_useful + 2.0 * n * cout * cout * (hw - 1))
    # the forward is dominated by the 3x3 branches: about 40% of their FLOPs multiply padding
    assert 0.35 < 1 - conv3_useful / conv3_dense < 0.45
    assert common.mode_flops((useful, dense), "fwd_bwd") == (3 * useful, 3 * dense)
    assert common.mode_flops((useful, dense), "eval_fwd") == (useful, dense)


def test_quantile_matches_torch():
    values = torch.rand(11).tolist()
    for q in common.QUANTILES:
        assert math.isclose(common.quantile(values, q), torch.quantile(torch.tensor(values), q).item(), rel_tol=1e-5)


def test_cpu_timing_loop_warms_up_and_repeats(monkeypatch):
    """On CPU, bench() runs CPU_WARMUP untimed calls (one fewer when the caller already ran fn) and then at least
    CPU_MIN_REPS timed ones, for at least CPU_MIN_S seconds, at most CPU_MAX_REPS; --quick: 1 warm-up, 3 timed."""
    calls = []
    fn = lambda: calls.append(1)  # noqa: E731
    monkeypatch.setattr(common, "CPU_MIN_S", 0.0)
    common.bench(fn, torch.device("cpu"))
    assert len(calls) == common.CPU_WARMUP + common.CPU_MIN_REPS
    calls.clear()
    common.bench(fn, torch.device("cpu"), warm=True)
    assert len(calls) == common.CPU_WARMUP - 1 + common.CPU_MIN_REPS
    calls.clear()
    common.bench(fn, torch.device("cpu"), quick=True)
    assert len(calls) == 1 + 3
    calls.clear()
    monkeypatch.setattr(common, "CPU_MIN_S", 60.0)  # a time floor longer than the cap: the cap ends the loop
    monkeypatch.setattr(common, "CPU_MAX_REPS", 25)
    common.bench(fn, torch.device("cpu"))
    assert len(calls) == common.CPU_WARMUP + 25


def test_interleaved_timing_rotates_the_order_and_drops_a_failing_function(monkeypatch):
    """interleaved_times: CPU_WARMUP - 1 warm-up calls each, then rounds of one timed call per function, the order
    rotating by one each round; a function that raises is dropped with its exception, the others go on; grads are
    cleared before every call."""
    monkeypatch.setattr(common, "CPU_MIN_S", 0.0)
    log = []
    param = torch.zeros(1, requires_grad=True)

    def make(name, fail_at=None):
        def fn():
            assert param.grad is None, "grad not cleared"
            log.append(name)
            if fail_at is not None and log.count(name) == fail_at:
                raise RuntimeError(f"{name} broke")
            param.grad = torch.ones(1)
        return fn

    calls = [(make("a"), [param]), (make("b", fail_at=common.CPU_WARMUP + 2), [param]), (make("c"), [param])]
    times = common.interleaved_times(calls)
    warm = common.CPU_WARMUP - 1
    assert log[:3 * warm] == ["a"] * warm + ["b"] * warm + ["c"] * warm
    rounds = log[3 * warm:]
    assert rounds[:9] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # b raises in round 3
    assert rounds[9:13] == ["c", "a", "a", "c"]  # two left, still rotating
    assert isinstance(times[1], RuntimeError) and "b broke" in str(times[1])
    assert len(times[0]) == len(times[2]) == common.CPU_MIN_REPS
    assert all(t >= 0 for t in times[0] + times[2])
    log.clear()
    quick = common.interleaved_times([(make("a"), [param]), (make("c"), [param])], quick=True)
    assert log == ["a", "c"] + ["a", "c", "c", "a", "a", "c"] and [len(t) for t in quick] == [3, 3]


def test_runner_group_times_cases_together_and_keeps_their_order(monkeypatch, tmp_path):
    """Inside runner.group() on the CPU, run() only collects; at the end every case is built, timed interleaved,
    and its row (skipped, error or ok) lands in submission order. Outside a group each case runs at once."""
    monkeypatch.setattr(common, "CPU_MIN_S", 0.0)
    args = type("Args", (), dict(budget_s=None, out=tmp_path, name="group", quick=True, profile=False))()
    env = dict.fromkeys(common.ENV_FIELDS, "x")
    runner = common.Runner(env, torch.device("cpu"), args, None)
    log = []

    def build(name):
        def make():
            if name == "broken":
                raise ValueError("cannot build")
            log.append(f"build {name}")
            return (lambda: log.append(name)), []
        return make

    case = dict(op="conv_bn_relu", mode="eval_fwd", dtype="fp32", shape="s", batch=1)
    with runner.group():
        runner.run(build("eager"), provider="eager", **case)
        runner.run(build("x"), reason="not here", provider="triton", **case)
        runner.run(build("broken"), provider="cuda", **case)
        runner.run(build("cpu"), provider="cpu", **case)
        assert runner.rows == [] and log == []
    assert log[:4] == ["build eager", "eager", "build cpu", "cpu"]  # built and called once each, in order
    assert log[4:] == ["eager", "cpu"] + ["eager", "cpu", "cpu", "eager", "eager", "cpu"]  # warm-up, 3 rounds
    assert [(r["provider"], r["status"]) for r in runner.rows] == [
        ("eager", "ok"), ("triton", "skipped"), ("cuda", "error"), ("cpu", "ok")]
    assert "cannot build" in runner.rows[2]["note"] and runner.rows[0]["speedup_vs_eager"] is not None
    log.clear()
    runner.run(build("alone"), provider="eager", **dict(case, shape="t"))
    assert log[0] == "build alone" and runner.rows[-1]["status"] == "ok"


def test_runner_group_skips_the_cases_left_when_the_budget_is_spent_while_building(monkeypatch, tmp_path):
    """--budget-s inside a CPU group: a case whose turn to be built comes after the budget is spent is skipped, as
    outside a group; the cases built before it are timed."""
    monkeypatch.setattr(common, "CPU_MIN_S", 0.0)
    args = type("Args", (), dict(budget_s=60.0, out=tmp_path, name="budget", quick=True, profile=False))()
    runner = common.Runner(dict.fromkeys(common.ENV_FIELDS, "x"), torch.device("cpu"), args, None)
    spent = []
    monkeypatch.setattr(runner.budget, "spent", lambda: bool(spent))
    built = []

    def build(name):
        def make():
            built.append(name)
            spent.append(True)  # this build used up the budget
            return (lambda: None), []
        return make

    case = dict(op="conv_bn_relu", mode="eval_fwd", dtype="fp32", shape="s", batch=1)
    with runner.group():
        for provider in ("eager", "eager-cl", "cpu"):
            runner.run(build(provider), provider=provider, **case)
    assert built == ["eager"]
    assert [(r["provider"], r["status"]) for r in runner.rows] == [
        ("eager", "ok"), ("eager-cl", "skipped"), ("cpu", "skipped")]
    assert "time budget of 60 s spent" in runner.rows[1]["note"]


def test_make_row_rejects_unknown_fields():
    env = dict.fromkeys(common.ENV_FIELDS, "x")
    assert set(common.make_row(env, op="aspp")) == set(common.FIELDS)
    with pytest.raises(KeyError, match="median"):
        common.make_row(env, median=1.0)


# ---- the scripts, on CPU ---------------------------------------------------------------------------------------


def _read(out: Path, name: str) -> tuple[list[dict], dict]:
    with (out / f"{name}.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == common.FIELDS
        rows = list(reader)
    data = json.loads((out / f"{name}.json").read_text())
    assert len(data["rows"]) == len(rows)
    assert all(tuple(r) == common.FIELDS for r in data["rows"])
    return data["rows"], data["meta"]


def _check_timed(rows: list[dict], providers: set[str], modes: set[str]) -> None:
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["provider"] for r in ok} == providers, [(r["provider"], r["status"], r["note"]) for r in rows]
    assert {r["mode"] for r in ok} == modes
    for r in ok:
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
        assert r["device"] == "cpu" and r["gpu"].startswith("none (CPU:") and r["torch"] == torch.__version__
        assert r["git_commit"] and r["time"].endswith("Z")
        assert r["peak_mem_mb"] is None  # not measured on CPU
        assert r["speedup_vs_eager"] > 0
        if r["provider"] == "eager":
            assert r["speedup_vs_eager"] == pytest.approx(1.0)
        if r["useful_tflops"] is not None:
            assert 0 < r["useful_tflops"] <= r["dense_tflops"]
            # every script divides by a matmul it measures (train_bench's FLOPs: flop_counter's, padding included)
            assert r["pct_peak"] > 0


def test_aspp_bench_cpu_quick(tmp_path, capsys):
    import aspp_bench

    plot = ["--plot"] * (importlib.util.find_spec("matplotlib") is not None)  # without it: a usage error
    argv = [*QUICK, "--out", str(tmp_path), "--providers", "cpu,cpu-cl,reference,eager,cuda", *plot]
    assert aspp_bench.main(argv) == 0
    rows, meta = _read(tmp_path, "aspp_bench")
    _check_timed(rows, {"cpu", "cpu-cl", "reference", "eager"}, {"train_fwd", "eval_fwd", "fwd_bwd"})
    # the cuda backend cannot run CPU tensors: recorded as skipped with deeplab_ops' reason, never a crash
    cuda = [r for r in rows if r["provider"] == "cuda"]
    assert cuda and all(r["status"] == "skipped" and "CUDA tensors" in r["note"] for r in cuda)
    assert meta["matmul_peak_tflops"] > 0 and "valid_tap_fraction" in meta
    out = capsys.readouterr()
    assert "provider" in out.out and "skipped" in out.out
    # the table's title names the processor (the gpu column's "none (CPU: …)" is for the CSV)
    assert "ASPP on CPU: " in out.out and "ASPP on none" not in out.out
    # and so does the header line (it printed the gpu column's "none (CPU: …) | torch …")
    assert out.out.startswith("CPU: ") and " | torch " in out.out.splitlines()[0], out.out.splitlines()[0]
    (tmp_path / "aspp_bench.json").rename(tmp_path / "aspp_goal.json")
    goals = "\n".join(common.goal_report(tmp_path))
    assert "ASPP forward + backward vs best eager [32x9x9 r2/4/6 ->16, fp32, N2" in goals and "(goal 1.6x)" in goals
    assert "vs eager (goal" in goals  # the anchor is named: here the only eager setup that ran
    assert "no compile / compile-max row" in goals and "no train_bench.json" in goals
    # roofline: the op's minimum bytes and FLOPs on every timed row; no bound on a CPU (no peak known)
    for r in rows:
        if r["status"] == "ok":
            assert r["min_bytes"] == common.aspp_min_bytes(2, 32, 16, 9, 9, (2, 4, 6), r["mode"], 4), r
            assert r["flops"] == pytest.approx(r["useful_tflops"] * 1e12 * r["median_ms"] * 1e-3)
            assert r["bound_us"] is None and r["pct_of_bound"] is None
    if plot:
        assert (tmp_path / "aspp_bench.png").stat().st_size > 0


def test_quick_keeps_what_was_asked_for(tmp_path):
    """--quick shrinks the defaults, not explicit lists: --batches and --configs (aspp_bench), --models and
    --batches (train_bench) run as given; a training batch of 1 is recorded as skipped, as documented."""
    import aspp_bench

    argv = [*QUICK, "--out", str(tmp_path), "--providers", "eager", "--modes", "train_fwd,eval_fwd", "--batches",
            "1,3", "--configs", "os8,os16"]
    assert aspp_bench.main(argv) == 0
    rows, _ = _read(tmp_path, "aspp_bench")
    assert {(r["batch"], r["shape"].split(" ")[0]) for r in rows} == {(b, s) for b in (1, 3)
                                                                        for s in ("32x17x17", "32x9x9")}
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert skipped and all(r["batch"] == 1 and r["mode"] == "train_fwd" for r in skipped)
    import train_bench

    parser_rows = tmp_path / "train"
    assert train_bench.main([*QUICK, "--out", str(parser_rows), "--providers", "eager", "--modes", "eval_fwd",
                             "--batches", "1,2", "--models", "r101"]) == 0
    rows, _ = _read(parser_rows, "train_bench")
    assert sorted(r["batch"] for r in rows) == [1, 2] and all("r101" in r["shape"] for r in rows)


def test_conv_bn_relu_bench_cpu_quick(tmp_path):
    import conv_bn_relu_bench

    assert conv_bn_relu_bench.main([*QUICK, "--out", str(tmp_path)]) == 0
    rows, _ = _read(tmp_path, "conv_bn_relu_bench")
    _check_timed(rows, {"cpu", "cpu-cl", "reference", "eager", "eager-cl"}, {"train_fwd", "eval_fwd", "fwd_bwd"})
    assert any("+res" in r["shape"] for r in rows)
    for r in rows:  # the minimum bytes of each shape (16 channels at 9x9, 3x3 dilation 2; 1x1 16 -> 32 + residual)
        residual = "+res" in r["shape"]
        cout, k = (32, 1) if residual else (16, 3)
        assert r["min_bytes"] == common.conv_bn_relu_min_bytes(2, 16, cout, 9, 9, k, 9, 9, residual, r["mode"], 4)


def test_train_bench_cpu_quick(tmp_path, monkeypatch):
    import train_bench

    # What each provider's step runs: cpu-lean is the model as train.py --fused-ops --memory-efficient trains it,
    # channels_last (train.py's default with --fused-ops; it ran NCHW, and looked 1.9x slower than cpu-cl for it).
    layouts, step_case = {}, train_bench.step_case

    def recording(mode, net, x, *args, **kwargs):
        conv = net.backbone.conv1.weight
        layouts[x.is_contiguous(memory_format=torch.channels_last), conv.is_contiguous(
            memory_format=torch.channels_last), kwargs.get("lean", False)] = True
        return step_case(mode, net, x, *args, **kwargs)

    monkeypatch.setattr(train_bench, "step_case", recording)
    # few providers keep this short: each call is a whole ResNet-50 step
    assert train_bench.main([*QUICK, "--providers", "cpu,cpu-cl,eager,cpu-lean", "--out", str(tmp_path)]) == 0
    assert set(layouts) == {(False, False, False), (True, True, False), (True, True, True)}, layouts
    rows, meta = _read(tmp_path, "train_bench")
    _check_timed(rows, {"cpu", "cpu-cl", "eager", "cpu-lean"}, {"train_step", "eval_fwd"})
    assert all(r["images_per_s"] > 0 for r in rows)
    flops = {mode: {r["flops"] / r["batch"] for r in rows if r["mode"] == mode} for mode in ("train_step", "eval_fwd")}
    assert len(flops["train_step"]) == len(flops["eval_fwd"]) == 1, flops  # one model: every provider the same
    # a training step is forward + backward: about 3x the forward (flop_counter's count of the same convolutions)
    assert 2.5 < flops["train_step"].pop() / flops["eval_fwd"].pop() < 3.5
    assert all(r["min_bytes"] > 0 and r["bound_us"] is None for r in rows)
    assert meta["matmul_peak_tflops"] > 0 and meta["matmul_peak"].startswith("float32 512x512x512 matmul on cpu")


def test_train_bench_anchors_cpu_quick(tmp_path):
    import train_bench

    # the eager setups users run, in bf16: channels_last, and autocast over an fp32 model (eager NCHW is timed in
    # test_train_bench_cpu_quick; without it here, speedup_vs_eager stays empty)
    argv = [*QUICK, "--providers", "eager-cl,eager-amp", "--dtypes", "bf16", "--modes", "train_step",
            "--out", str(tmp_path)]
    assert train_bench.main(argv) == 0
    rows, _ = _read(tmp_path, "train_bench")
    assert [(r["provider"], r["status"]) for r in rows] == [("eager-cl", "ok"), ("eager-amp", "ok")], rows
    assert all(r["speedup_vs_eager"] is None and r["images_per_s"] > 0 for r in rows)
    _check_anchor(rows)


def _check_anchor(rows: list[dict]) -> None:
    """Per case, the anchor is the fastest eager setup that ran, and every ok row's speedup_vs_anchor is against it."""
    ok = [r for r in rows if r["status"] == "ok"]
    for case in {(r["op"], r["mode"], r["dtype"], r["shape"], r["batch"]) for r in ok}:
        sel = [r for r in ok if (r["op"], r["mode"], r["dtype"], r["shape"], r["batch"]) == case]
        fastest = min((r for r in sel if r["provider"] in common.EAGER_PROVIDERS), key=lambda r: r["median_ms"])
        for r in sel:
            assert r["anchor"] == fastest["provider"], (case, r["provider"])
            assert r["speedup_vs_anchor"] == pytest.approx(fastest["median_ms"] / r["median_ms"])
            if r["provider"] in common.EAGER_PROVIDERS:
                assert r["speedup_vs_anchor"] <= 1.0 + 1e-9


def test_aspp_bench_anchors_cpu_quick(tmp_path):
    import aspp_bench

    argv = [*QUICK, "--out", str(tmp_path), "--providers", "eager,eager-cl,eager-amp,eager-cl-amp,cpu", "--dtypes",
            "fp32,bf16", "--modes", "train_fwd,fwd_bwd"]
    assert aspp_bench.main(argv) == 0
    rows, _ = _read(tmp_path, "aspp_bench")
    # autocast runs bf16 or fp16: at fp32 the -amp setups are skipped with that reason; at bf16 every setup runs
    amp_fp32 = [r for r in rows if r["provider"].endswith("-amp") and r["dtype"] == "fp32"]
    assert len(amp_fp32) == 4 and all(r["status"] == "skipped" and "autocast" in r["note"] for r in amp_fp32)
    bf16 = [r for r in rows if r["dtype"] == "bf16"]
    assert len(bf16) == 10 and all(r["status"] == "ok" for r in bf16), [(r["provider"], r["note"]) for r in bf16]
    _check_anchor(rows)


def test_conv_bn_relu_bench_anchors_cpu_quick(tmp_path):
    import conv_bn_relu_bench

    argv = [*QUICK, "--out", str(tmp_path), "--providers", "eager-cl,eager-amp", "--dtypes", "bf16",
            "--modes", "fwd_bwd"]
    assert conv_bn_relu_bench.main(argv) == 0
    rows, _ = _read(tmp_path, "conv_bn_relu_bench")
    assert [r["status"] for r in rows] == ["ok"] * 4, [(r["provider"], r["note"]) for r in rows]
    assert all(r["speedup_vs_eager"] is None for r in rows)  # no eager NCHW row ran: nothing to divide by
    _check_anchor(rows)


def test_eager_setups():
    # eager-amp: the module stays float32 and its forward runs in the autocast dtype; -cl: channels_last throughout
    cpu = torch.device("cpu")
    conv = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8))
    x = torch.randn(2, 4, 6, 6, dtype=torch.bfloat16)
    amp = common.prepare_eager(conv, "eager-cl-amp", cpu, torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in amp.parameters())
    assert amp[0].weight.is_contiguous(memory_format=torch.channels_last)
    xin = common.prepare_input(x, "eager-cl-amp")
    assert xin.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(
        memory_format=torch.channels_last)
    fn, grads = common.mode_case("fwd_bwd", amp, [xin], amp=common.autocast_dtype("eager-cl-amp", "bf16"))
    fn()
    assert amp[0].weight.grad.dtype == torch.float32 and xin.grad.dtype == torch.bfloat16
    forward, _ = common.mode_case("eval_fwd", amp, [xin], amp=torch.bfloat16)
    assert forward().dtype == torch.bfloat16
    plain = common.prepare_eager(torch.nn.Conv2d(4, 8, 3), "eager", cpu, torch.bfloat16)
    assert plain.weight.dtype == torch.bfloat16 and common.autocast_dtype("eager", "bf16") is None
    assert common.prepare_input(x, "eager") is x
    assert common.eager_unavailable("eager-amp", "fp32") and common.eager_unavailable("eager-amp", "tf32")
    assert not common.eager_unavailable("eager-amp", "fp16") and not common.eager_unavailable("eager-cl", "fp32")


def _row(provider, ms, mode="train_fwd", dtype="bf16", shape="s", batch=16, gpu="test GPU", **extra):
    return {"op": "aspp", "provider": provider, "mode": mode, "dtype": dtype, "shape": shape, "batch": batch,
            "status": "ok", "median_ms": ms, "gpu": gpu, **extra}


def test_fill_speedups_anchor_and_compile():
    rows = [_row("eager", 4.0), _row("eager-cl", 2.0), _row("eager-amp", 3.0), _row("compile", 2.5),
            _row("compile-max", 1.6), _row("cuda", 1.0), {**_row("eager-cl-amp", 0.5), "status": "error"},
            _row("cuda", 8.0, dtype="fp32"), _row("eager", 16.0, dtype="fp32")]
    common.fill_speedups(rows)
    by = {(r["provider"], r["dtype"]): r for r in rows}
    cuda = by[("cuda", "bf16")]
    assert (cuda["anchor"], cuda["speedup_vs_anchor"], cuda["speedup_vs_eager"]) == ("eager-cl", 2.0, 4.0)
    assert cuda["speedup_vs_compile"] == pytest.approx(1.6)
    assert by[("eager-amp", "bf16")]["speedup_vs_anchor"] == pytest.approx(2 / 3)
    assert by[("eager-cl-amp", "bf16")].get("anchor") is None  # a failed row is not compared (nor an anchor)
    fp32 = by[("cuda", "fp32")]  # another dtype is another case
    assert (fp32["anchor"], fp32["speedup_vs_anchor"], fp32.get("speedup_vs_compile")) == ("eager", 2.0, None)


def test_goal_report_reads_the_best_eager_and_compile(tmp_path):
    rows = [_row("eager", 4.0), _row("eager-cl", 2.0), _row("eager-amp", 3.0), _row("compile", 2.5),
            _row("compile-max", 1.6), _row("cuda", 1.0), _row("triton", 2.0),
            _row("eager", 10.0, mode="fwd_bwd"), _row("cuda", 5.0, mode="fwd_bwd")]
    (tmp_path / "aspp_goal.json").write_text(json.dumps({"rows": rows, "meta": {}}))
    lines = common.goal_report(tmp_path)
    head = "ASPP train forward vs best eager [s, bf16, N16, test GPU]: "
    assert head + "cuda 2.00x vs eager-cl (goal 1.8x) met; vs eager NCHW 4.00x" in lines
    assert head + "triton 1.00x vs eager-cl (goal 1.8x) NOT met; vs eager NCHW 2.00x" in lines
    comp = "ASPP train forward vs torch.compile [s, bf16, N16, test GPU]: "
    assert comp + "cuda 1.60x vs compile-max (goal 1.4x) met" in lines
    assert comp + "triton 0.80x vs compile-max (goal 1.4x) NOT met" in lines
    # only eager NCHW ran in fwd_bwd: it is the anchor, and no second ratio is printed
    fwd_bwd = "ASPP forward + backward vs best eager [s, bf16, N16, test GPU]: "
    assert fwd_bwd + "cuda 2.00x vs eager (goal 1.6x) met" in lines
    assert "ASPP eval forward vs best eager: no eval_fwd row ran in aspp_goal.json" in lines


def _profiled_layer(calls_per_call: int):
    def inner(t):
        return t * 2

    def fn():
        t = torch.ones(3)
        for _ in range(calls_per_call):
            t = inner(t)
        return t

    return fn, inner


def test_host_profile_says_where_the_host_time_goes():
    """--profile's host section: host µs per call without a profiler, then the functions with the most time of their
    own per call under cProfile, with their calls per call (here: a nested Python function called 5 times per call,
    named by this file and its line)."""
    fn, inner = _profiled_layer(5)
    text = common.host_profile(fn, torch.device("cpu"), calls=4, rows=50)
    head, columns, *rows = text.splitlines()
    assert re.fullmatch(r"host: \d+\.\d µs per call without a profiler \(4 calls, no synchronization between them\); "
                        r"under cProfile \d+\.\d µs per call, the functions with the most time of their own:", head)
    assert columns.split() == ["calls/call", "own", "µs/call", "cum", "µs/call", "function"]
    where = f"tests/benchmarks/test_benchmarks.py:{inner.__code__.co_firstlineno}(inner)"
    mine = [r for r in rows if r.endswith(where)]
    assert len(mine) == 1, text
    assert float(mine[0].split()[0]) == 5  # calls per call
    assert any(r.endswith("<built-in method torch.ones>") for r in rows), text


def test_profile_file_holds_the_kernels_and_the_host_table(tmp_path):
    """profile_case appends, per case, the torch.profiler table and the host table below it."""
    fn, _ = _profiled_layer(2)
    path = tmp_path / "p_profile.txt"
    common.profile_case(fn, torch.device("cpu"), path, "case one")
    common.profile_case(fn, torch.device("cpu"), path, "case two")
    text = path.read_text()
    assert text.count("==== case ") == 2 and text.index("==== case one") < text.index("==== case two")
    assert text.count("Self CPU time total") == 2 and text.count("µs per call without a profiler") == 2
    assert text.index("Self CPU time total") < text.index("µs per call without a profiler") < text.index("case two")


# ---- -graph providers: another provider's case captured in a CUDA graph ------------------------------------------


def test_graph_providers_name_the_case_they_capture():
    assert [common.base_provider(p) for p in common.GRAPH_PROVIDERS] == [
        "eager", "eager-cl", "cuda", "triton", "cuda-cl", "triton-cl"]
    assert common.fused_backend("triton-graph") == "triton" and common.fused_backend("cuda-cl-graph") == "cuda"
    assert common.fused_backend("eager-graph") is None
    assert common.uses_channels_last("triton-cl-graph") and common.uses_channels_last("eager-cl-graph")
    assert not common.uses_channels_last("triton-graph") and not common.uses_autocast("eager-graph")
    assert common.base_provider("triton-lean") == "triton-lean"  # not a -graph provider: unchanged
    for module in ("aspp_bench", "conv_bn_relu_bench"):
        assert set(common.GRAPH_PROVIDERS) <= set(__import__(module).PROVIDERS)


@pytest.mark.parametrize("module, extra", [("aspp_bench", []), ("conv_bn_relu_bench", ["--shapes", "os16"])])
def test_graph_providers_are_skipped_on_the_cpu_saying_why(module, extra, tmp_path):
    argv = [*QUICK, "--out", str(tmp_path), "--name", "g", "--providers", "cpu,triton-graph,eager-graph", "--modes",
            "train_fwd", *extra]
    assert __import__(module).main(argv) == 0
    rows, _ = _read(tmp_path, "g")
    graph_rows = [r for r in rows if r["provider"].endswith("-graph")]
    assert graph_rows and all(r["status"] == "skipped" for r in graph_rows)
    assert {r["note"] for r in graph_rows} == {f"{p} replays a CUDA graph: it needs --device cuda"
                                              for p in ("triton-graph", "eager-graph")}
    assert all(r["status"] == "ok" for r in rows if r["provider"] == "cpu")


def test_graphed_warms_up_on_a_side_stream_then_captures_one_call(monkeypatch):
    """common.graphed: the case runs `warmups` times on a side stream, its gradients are set to None (the captured
    backward then writes them, as the other providers' timed calls do), then it runs once under capture; what is
    timed is the replay, which keeps the case alive, and no gradient is cleared between replays (they are the graph's
    memory). Stand-ins for the CUDA calls record the order (no GPU here)."""
    events = []

    class Stream:
        def __init__(self, device):
            self.name = "side"

        def wait_stream(self, other):
            events.append(f"{self.name} waits for {other.name}")

    class Current(Stream):
        def __init__(self):
            self.name = "current"

    @contextlib.contextmanager
    def on_stream(stream):
        events.append(f"on {stream.name}")
        yield
        events.append(f"off {stream.name}")

    class Graph:
        def replay(self):
            events.append("replay")

    @contextlib.contextmanager
    def capture(graph):
        events.append("capture")
        yield
        events.append("captured")

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Current())
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(common, "synchronize", lambda device: events.append("sync"))
    def case():
        weight = torch.zeros(2, requires_grad=True)
        weight.grad = torch.ones(2)  # as a warm-up's backward leaves it

        def call():
            events.append(f"call, grad {'None' if weight.grad is None else 'set'}")

        return (call, [weight]), [weakref.ref(call), weakref.ref(weight)]

    made, refs = case()
    replay, cleared = common.graphed(made, torch.device("cuda"), warmups=2)
    assert cleared == []
    assert events == ["side waits for current", "on side", "call, grad set", "call, grad set", "off side",
                      "current waits for side", "capture", "call, grad None", "captured", "sync"]
    # the replay keeps the case alive (a CUDA graph does not keep the memory it reads and writes)
    del made
    gc.collect()
    assert all(r() is not None for r in refs)
    replay()
    assert events[-1] == "replay"
    with pytest.raises(RuntimeError, match="a CUDA graph needs a CUDA device"):
        common.graphed((lambda: None, []), torch.device("cpu"))


# ---- roofline ----------------------------------------------------------------------------------------------------


def test_conv_bn_relu_bench_shape_sets():
    """--shape-set: DeepLab's own layer shapes on either device, or the small set; --quick keeps two rows."""
    import conv_bn_relu_bench as bench

    groups = ["os16", "os8", "aspp"]
    assert bench.select_shapes(False, None, groups, False) == list(bench.CPU_SHAPES)
    assert bench.select_shapes(False, None, None, True) == list(bench.QUICK_CPU_SHAPES)
    assert bench.select_shapes(False, None, None, False) == list(bench.CPU_SHAPES)
    # --quick keeps the groups and the set given (it used to return the two quick os16 rows for any of them)
    assert bench.select_shapes(False, None, ["aspp"], True) == [s for s in bench.CPU_SHAPES if s.group == "aspp"]
    assert bench.select_shapes(False, "small", None, True) == list(bench.CPU_SHAPES[:2])
    assert bench.select_shapes(True, None, groups, False) == list(bench.CUDA_SHAPES)
    deeplab_cpu = bench.select_shapes(False, "deeplab", ["os16"], False)
    assert deeplab_cpu == [s for s in bench.CUDA_SHAPES if s.group == "os16"]
    assert any(s.cin == 512 and s.cout == 512 for s in deeplab_cpu)  # layer4's real channel count
    assert bench.select_shapes(False, "deeplab", ["aspp"], True) == [s for s in bench.CUDA_SHAPES
                                                                    if s.group == "aspp"][:2]
    assert bench.select_shapes(True, "small", ["os16"], False) == [s for s in bench.CPU_SHAPES if s.group == "os16"]
    # with groups given, --quick keeps the first two rows of each: every group asked for runs (it kept the first two
    # rows of all, so `--quick --shapes os16,os8,aspp` ran two os16 rows and neither of the others)
    quick_all = bench.select_shapes(False, "deeplab", groups, True)
    assert [s.group for s in quick_all] == ["os16", "os16", "os8", "os8", "aspp", "aspp"]
    assert quick_all == [s for g in groups for s in [t for t in bench.CUDA_SHAPES if t.group == g][:2]]
    assert {s.group for s in bench.select_shapes(False, None, ["os8", "aspp"], True)} == {"os8", "aspp"}
    with pytest.raises(SystemExit):  # argparse names the option and its choices
        bench.main(["--device", "cpu", "--shape-set", "huge"])


def test_the_small_shape_sets_words_are_true(capsys):
    """docs/benchmarks.md and --help called the cpu "small" set "the same kernels, strides and dilations" as the
    deeplab set, which has a layer1, dilation-2 rows and five more ASPP rates that it lacks. The words now name what
    it leaves out; this keeps them true of CPU_SHAPES."""
    import conv_bn_relu_bench as bench

    small, deeplab = bench.CPU_SHAPES, bench.CUDA_SHAPES
    missing_layers = {s.name for s in deeplab} - {s.name for s in small}
    missing_dilations = {s.dilation for s in deeplab if s.name != "aspp"} - {s.dilation for s in small}
    rates = {s.dilation for s in small if s.name == "aspp"}
    assert missing_layers == {"layer1"} and missing_dilations == {2} and rates == {6}, (missing_layers,
                                                                                    missing_dilations, rates)
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| conv_bn_relu_bench | `--shape-set`"))
    for words in ("no layer1", "no dilation-2 row", "one ASPP branch at rate 6", "not each of its rows"):
        assert words in row, (words, row)
    assert "same kernels, strides and dilations" not in row
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "same kernels, strides and dilations" not in help_text and "no layer1" in help_text


def test_aspp_bench_times_compile_max_apart_as_the_docs_say(tmp_path, monkeypatch):
    """docs/benchmarks.md said that on the CPU a case's providers are timed interleaved; aspp_bench's compile-max
    rows run in a pass of their own after every other provider's (a GPU budget cut leaves them out), so they were
    never interleaved with the eager rows of their case. The docs say so now."""
    import aspp_bench

    groups = []
    monkeypatch.setattr(common.Runner, "_run_group", lambda self, cases: groups.append(
        [case["provider"] for *_, case in cases]))
    argv = [*QUICK, "--out", str(tmp_path), "--providers", "eager,compile-max,cpu", "--modes", "eval_fwd"]
    aspp_bench.main(argv)
    assert groups == [["eager", "cpu"], ["compile-max"]], groups
    doc = " ".join((ROOT / "docs" / "benchmarks.md").read_text().split())
    assert "compile-max is not interleaved with the eager rows of its case" in doc
    assert "aspp_bench's compile-max apart, in a pass of its own" in doc


def test_conv_bn_relu_min_bytes_by_hand():
    # 1x4x5x5 -> 8 channels, 3x3, padding 1 (out 5x5), float32: x 100, weight 8*4*9 = 288, out 200, BN 4*8 = 32
    b = common.conv_bn_relu_min_bytes
    assert b(1, 4, 8, 5, 5, 3, 5, 5, False, "eval_fwd", 4) == (100 + 288 + 32 + 200) * 4
    # training also writes the running mean and var (16)
    assert b(1, 4, 8, 5, 5, 3, 5, 5, False, "train_fwd", 4) == (100 + 288 + 32 + 200 + 16) * 4
    # backward: read grad_out 200, x 100, weight 288, out 200, BN weight 8; write grad_x 100, grad_weight 288, 16
    assert b(1, 4, 8, 5, 5, 3, 5, 5, False, "fwd_bwd", 4) == (636 + 796 + 404) * 4
    # a residual is read in the forward and its gradient written in the backward (200 each)
    assert b(1, 4, 8, 5, 5, 3, 5, 5, True, "eval_fwd", 2) == (620 + 200) * 2
    assert b(1, 4, 8, 5, 5, 3, 5, 5, True, "fwd_bwd", 2) == (836 + 796 + 604) * 2
    with pytest.raises(ValueError, match="mode 'train'"):
        b(1, 4, 8, 5, 5, 3, 5, 5, False, "train", 4)


def test_aspp_min_bytes_by_hand():
    # N=2, C_in 8 -> 4 channels, 5x5, rates 1/2/3, bf16. Weights: 1x1 32 + pooling 1x1 32 + three 3x3 3*8*4*9 = 864
    # + projection (3+2)*4*4 = 80 = 1008; BN: 6 layers x 4 vectors x 4 = 96; x 2*8*25 = 400; out 2*4*25 = 200
    b = common.aspp_min_bytes
    assert b(2, 8, 4, 5, 5, (1, 2, 3), "eval_fwd", 2) == (400 + 1008 + 96 + 200) * 2
    assert b(2, 8, 4, 5, 5, (1, 2, 3), "train_fwd", 2) == (1704 + 48) * 2  # + running mean and var written
    # backward: read grad_out 200, x 400, weights 1008, out 200, BN weights 24; write grad_x 400, grads 1008 + 48
    assert b(2, 8, 4, 5, 5, (1, 2, 3), "fwd_bwd", 2) == (1752 + 1832 + 1456) * 2


@pytest.mark.parametrize(("name", "expected"), [
    ("NVIDIA H200", "H200"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"), ("NVIDIA A100-SXM4-80GB", "A100 80GB"),
    ("NVIDIA A100-SXM4-40GB", "A100"), ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"),
    ("NVIDIA GeForce RTX 4090", None), ("none (CPU: Intel(R) Xeon(R) Processor, 2 logical cores, 1 threads)", None),
])
def test_gpu_peak_table(name, expected):
    peak = common.gpu_peak(name)
    assert (peak.name if peak else None) == expected


def test_roofline_bound_by_hand():
    h200 = common.gpu_peak("NVIDIA H200")
    assert (h200.tflops["bf16"], h200.tflops["fp32"], h200.tflops["tf32"], h200.hbm_tbps) == (989, 67, 494, 4.8)
    bound = common.roofline_bound_us
    # 989 MFLOP take 1 µs at 989 TFLOP/s, 4.8 MB take 1 µs at 4.8 TB/s: the larger of the two bounds
    assert bound(3 * 989e6, 4.8e6, "bf16", h200) == pytest.approx(3.0)
    assert bound(989e6, 5 * 4.8e6, "bf16", h200) == pytest.approx(5.0)
    assert bound(2 * 67e6, None, "fp32", h200) == pytest.approx(2.0)  # fp32: CUDA cores, TF32 off
    assert bound(None, 4.8e6, "fp32", h200) == pytest.approx(1.0)
    assert bound(1e9, 1e6, "bf16", None) is None  # no peak (a CPU): no bound
    a100 = common.gpu_peak("NVIDIA A100-SXM4-80GB")
    assert bound(312e6, 2.039e6, "bf16", a100) == pytest.approx(1.0)
    row = {"gpu": "NVIDIA H200", "dtype": "bf16", "median_ms": 0.01}
    common.fill_roofline(row, 4 * 989e6, 4.8e6)
    assert row["bound_us"] == pytest.approx(4.0) and row["pct_of_bound"] == pytest.approx(40.0)
    cpu = {"gpu": "none (CPU: x)", "dtype": "fp32", "median_ms": 1.0}
    common.fill_roofline(cpu, 1e9, 100)
    assert (cpu["flops"], cpu["min_bytes"], cpu["bound_us"], cpu["pct_of_bound"]) == (1e9, 100, None, None)


def test_row_counts_read_the_shape_labels(tmp_path):
    # rows written before the roofline columns: FLOPs and bytes from their labels, as the scripts wrote them
    import conv_bn_relu_bench

    s = next(c for c in conv_bn_relu_bench.CUDA_SHAPES if c.stride == 2)  # layer2 128->128 k3 s2 @129
    conv = {"op": "conv_bn_relu", "mode": "fwd_bwd", "dtype": "bf16", "batch": "16", "shape": s.label()}
    assert common.row_counts(conv) == (
        3 * common.conv_flops(16, 128, 128, 129, 129, 3, 1, 1, 2)[0],
        common.conv_bn_relu_min_bytes(16, 128, 128, 129, 129, 3, 65, 65, False, "fwd_bwd", 2))
    res = next(c for c in conv_bn_relu_bench.CUDA_SHAPES if c.residual)
    row = {**conv, "mode": "eval_fwd", "dtype": "fp32", "shape": res.label()}
    assert common.row_counts(row)[1] == common.conv_bn_relu_min_bytes(16, 256, 1024, 33, 33, 1, 33, 33, True,
                                                                      "eval_fwd", 4)
    aspp = {"op": "aspp", "mode": "train_fwd", "dtype": "bf16", "batch": 16, "shape": "2048x33x33 r6/12/18 ->256"}
    assert common.row_counts(aspp) == (common.aspp_flops(16, 2048, 256, 33, 33, (6, 12, 18))[0],
                                       common.aspp_min_bytes(16, 2048, 256, 33, 33, (6, 12, 18), "train_fwd", 2))
    assert common.row_counts({**aspp, "op": "deeplabv3"}) is None
    # the report: H200 rows get a bound (ASPP train forward, bf16: compute-bound, 315 GFLOP / 989 TFLOP/s)
    path = tmp_path / "r.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*aspp, "status", "median_ms", "provider", "gpu"])
        writer.writeheader()
        writer.writerow({**aspp, "status": "ok", "median_ms": "0.638", "provider": "cuda", "gpu": "NVIDIA H200"})
    lines = common.roofline_report(path)
    bound = common.aspp_flops(16, 2048, 256, 33, 33, (6, 12, 18))[0] / 989e12 * 1e6  # µs
    assert len(lines) == 2 and lines[1].split()[-2:] == [f"{bound:.3g}", f"{100 * bound / 638:.1f}"], lines


def test_train_step_min_bytes_by_hand():
    import train_bench

    # N=2 17x17 images (3 channels), 5 classes, 1000 parameters, float32
    images = 2 * 3 * 17 * 17 * 4
    assert train_bench.step_min_bytes("eval_fwd", 2, 17, 5, 1000, 4) == images + 4000 + 2 * 5 * 17 * 17 * 4
    assert train_bench.step_min_bytes("train_step", 2, 17, 5, 1000, 4) == images + 2 * 17 * 17 * 8 + 8 * 4000


def test_scripts_run_as_scripts_and_help():
    # `python benchmarks/X.py` finds common.py beside it; --help lists the flags
    result = subprocess.run([sys.executable, str(BENCH_DIR / "aspp_bench.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--device", "--dtypes", "--providers", "--modes", "--batches", "--quick", "--out", "--plot"):
        assert flag in result.stdout
    for module in ("conv_bn_relu_bench", "train_bench"):
        with pytest.raises(SystemExit) as e:
            __import__(module).main(["--help"])
        assert e.value.code == 0


def test_gpu_suite_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(BENCH_DIR / "gpu_suite.sh")], timeout=30).returncode == 0


def test_goal_report_reads_the_lean_memory_goal(tmp_path):
    # train_bench rows: the lean provider at 0.5x eager's peak memory and 1.1x its speed (met); cuda-lean at 0.7x
    # (not met); a lean row without an eager row of the same batch is not compared.
    def row(provider, ms, mem, batch=16):
        return {"op": "deeplabv3", "provider": provider, "mode": "train_step", "dtype": "bf16", "batch": batch,
                "shape": "deeplabv3_r50 os16 513x513", "status": "ok", "median_ms": ms, "peak_mem_mb": mem,
                "gpu": "test GPU"}

    rows = [row("eager", 110.0, 1000.0), row("triton-lean", 100.0, 500.0), row("cuda-lean", 100.0, 700.0),
            row("triton-lean", 50.0, 300.0, batch=8)]
    (tmp_path / "train_bench.json").write_text(json.dumps({"rows": rows, "meta": {}}))
    lines = [line for line in common.goal_report(tmp_path) if line.startswith("lean training step")]
    assert len(lines) == 2, lines
    assert "triton-lean memory 0.50x, speed 1.10x vs eager met" in lines[0] and "test GPU" in lines[0]
    assert lines[1].endswith("cuda-lean memory 0.70x, speed 1.10x vs eager NOT met")
    # with a faster eager setup (AMP: 100 ms, 800 MiB) the anchor is that one; eager NCHW's ratios follow
    rows.append(row("eager-amp", 100.0, 800.0))
    (tmp_path / "train_bench.json").write_text(json.dumps({"rows": rows, "meta": {}}))
    lines = [line for line in common.goal_report(tmp_path) if line.startswith("lean training step")]
    assert lines[0].endswith("triton-lean memory 0.62x, speed 1.00x vs eager-amp NOT met; vs eager NCHW memory "
                             "0.50x, speed 1.10x"), lines


# ---- git_commit: the project commit the rows name ---------------------------------------------------------------


def _git(cwd: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30)
    return result.stdout.strip()


def _repo(path: Path) -> str:
    """A git repository at path with one commit; its HEAD."""
    path.mkdir(parents=True, exist_ok=True)
    _git(path, "init", "-q")
    (path / "file.txt").write_text("x\n")
    _git(path, "add", "file.txt")
    _git(path, "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "commit", "-q", "-m", "c")
    return _git(path, "rev-parse", "HEAD")


def test_git_commit_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GIT_COMMIT", "abc1234")
    assert common.git_commit() == "abc1234"
    # $GIT_COMMIT wins over whatever repository (or none) the copy sits in
    assert common.git_commit(tmp_path) == "abc1234"
    monkeypatch.setenv("GIT_COMMIT", "")  # set but empty: as if unset
    assert common.git_commit(tmp_path) != ""


def test_git_commit_of_the_projects_own_repository(monkeypatch, tmp_path):
    monkeypatch.delenv("GIT_COMMIT", raising=False)
    head = _repo(tmp_path / "proj")
    assert common.git_commit(tmp_path / "proj") == head
    (tmp_path / "proj" / "file.txt").write_text("changed\n")
    assert common.git_commit(tmp_path / "proj") == head + "+dirty"


def test_git_commit_inside_another_repository_is_unknown(monkeypatch, tmp_path):
    # On the GPU machine the copy sat inside another repository: its HEAD is not this project's commit.
    monkeypatch.delenv("GIT_COMMIT", raising=False)
    outer_head = _repo(tmp_path / "outer")
    copy = tmp_path / "outer" / "work" / "deeplab_ops_copy"
    (copy / "benchmarks").mkdir(parents=True)
    assert common.git_commit(copy) == "unknown"
    assert outer_head not in common.git_commit(copy)


def test_git_commit_outside_any_repository_is_unknown(monkeypatch, tmp_path):
    monkeypatch.delenv("GIT_COMMIT", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git must not look above tmp_path
    (tmp_path / "copy").mkdir()
    assert common.git_commit(tmp_path / "copy") == "unknown"


def test_git_commit_in_the_rows(monkeypatch):
    monkeypatch.setenv("GIT_COMMIT", "feedbeef")
    assert common.environment(torch.device("cpu"))["git_commit"] == "feedbeef"


def test_goal_report_names_a_mode_that_did_not_run(tmp_path):
    # the first H200 run's aspp_goal stopped inside fwd_bwd: no eval_fwd rows, which the report must say
    row = {"op": "aspp", "provider": "eager", "mode": "train_fwd", "dtype": "bf16", "batch": 16, "shape": "s",
           "status": "ok", "median_ms": 1.0, "gpu": "test GPU"}
    (tmp_path / "aspp_goal.json").write_text(json.dumps({"rows": [row, {**row, "provider": "cuda"}], "meta": {}}))
    lines = common.goal_report(tmp_path)
    assert "ASPP eval forward vs best eager: no eval_fwd row ran in aspp_goal.json" in lines
    assert any(line.startswith("ASPP train forward vs best eager [s") and "cuda 1.00x" in line for line in lines)


# ---- gpu_suite.sh, driven by a stand-in python that records its calls ----------------------------------------------

FAKE_PYTHON = """#!/usr/bin/env bash
args="$*"
if [ -n "${FAKE_PWD:-}" ]; then args="$PWD | $args"; fi
if [ -n "${FAKE_TUNING:-}" ] && [[ "$1" == benchmarks/* ]]; then
    args="$args [tuning: ${DEEPLAB_OPS_TUNING_CACHE-unset}]"
fi
echo "${args//$'\\n'/ }" >> "$FAKE_LOG"
if [ -n "${FAKE_ENV_LOG:-}" ]; then echo "DEEPLAB_OPS_CUDA=${DEEPLAB_OPS_CUDA:-}" >> "$FAKE_ENV_LOG"; fi
if [ "$1 $2" = "-m pytest" ] && [ -n "${FAKE_NO_GPU_TESTS:-}" ] && [[ " $* " == *" -m gpu "* ]]; then exit 5; fi
if [ "$1 $2" = "-c import matplotlib" ] && [ -n "${FAKE_NO_MATPLOTLIB:-}" ]; then exit 1; fi
if [ "$1" = -c ] && [[ "$2" == *torch.cuda.is_available* ]] && [ -n "${FAKE_NO_TORCH_CUDA:-}" ]; then exit 1; fi
if [ "$1 $2" = "benchmarks/common.py goals" ] && [ -n "${FAKE_GOALS_FAIL:-}" ]; then
    echo "benchmarks/common.py goals: no aspp_goal.json" >&2; exit 1
fi
exit 0
"""


def _run_suite(tmp_path: Path, gpu: bool = True, cwd: Path | None = None,
               **env) -> tuple[subprocess.CompletedProcess, list[str], Path]:
    """gpu_suite.sh with the stand-in python, and a stand-in nvidia-smi first on PATH: one that lists a GPU, or
    (gpu=False) one that fails as it does where no GPU or driver is (whatever this machine has); started in `cwd`
    (the repository root unless given). FAKE_PWD=1 prefixes each recorded call with the folder it ran in."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/usr/bin/env bash\necho 'GPU 0: Stand-in GPU (UUID: GPU-0)'\n" if gpu else
                   "#!/usr/bin/env bash\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    smi.chmod(0o755)
    log, out = tmp_path / "calls.txt", tmp_path / "out"
    full_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": str(fake),
                "FAKE_LOG": str(log), "OUT": str(out), "TMPDIR": str(tmp_path), "GIT_COMMIT": "abc1234", **env}
    result = subprocess.run(["bash", str(BENCH_DIR / "gpu_suite.sh")], cwd=cwd or BENCH_DIR.parent, env=full_env,
                            capture_output=True, text=True, timeout=120)
    return result, log.read_text().splitlines() if log.exists() else [], out


def _work(calls: list[str]) -> list[str]:
    """The calls but the suite's first probe (whether torch sees the GPU that nvidia-smi lists), which runs nothing."""
    return [c for c in calls if "torch.cuda.is_available" not in c]


def test_gpu_suite_order_and_outputs(tmp_path):
    result, calls, out = _run_suite(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    first = next(i for i, c in enumerate(calls) if c.startswith("-c") and "_extension.load()" in c)
    info = calls.index("-m deeplab_ops")
    pytests = [i for i, c in enumerate(calls) if c.startswith("-m pytest")]
    benches = [i for i, c in enumerate(calls) if c.startswith("benchmarks/") and "_bench.py" in c]
    assert first < info < pytests[0] < benches[0], calls
    gpu, rest = calls[pytests[0]], calls[pytests[1]]
    assert " -n 8 " in gpu and " -rA " in gpu and " -v " in gpu and gpu.endswith("-m gpu tests"), gpu
    assert "-m not gpu and not slow tests" in rest
    assert "setup.py" not in " ".join(calls)  # the prebuilt library imported: no build
    # goals first, each with its own --budget-s; then the goal report
    names = [calls[i].split("--name ")[1].split()[0] for i in benches]
    assert names[:2] == ["aspp_goal", "train_bench"], names
    assert all("--budget-s" in calls[i] for i in benches)
    goals = calls.index(next(c for c in calls if c.startswith("benchmarks/common.py goals")))
    assert goals < benches[2]
    # after the goals: the first use of a DeepLabV3-R50 training step (specializations compiled, first-step time)
    assert names[2] == "first_use" and "overhead_bench.py --device cuda --r50-step" in calls[benches[2]], names
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"suite.log", "gpu_suite_results.tar.gz"} <= set(files), files
    assert "commit abc1234" in (out / "suite.log").read_text()


def test_gpu_suite_runs_the_whole_suite_when_nothing_is_marked_gpu(tmp_path):
    result, calls, _ = _run_suite(tmp_path, FAKE_NO_GPU_TESTS="1", GOAL_RESERVE_S="0")
    assert result.returncode == 0, result.stdout + result.stderr
    pytests = [c for c in calls if c.startswith("-m pytest")]
    assert len(pytests) == 2 and pytests[1].endswith("-rA tests"), pytests  # no -m: the whole suite
    assert "no test is marked gpu" in result.stdout


def test_gpu_suite_runs_the_whole_suite_where_suite_phases_names_pytest_all(tmp_path):
    # SUITE_PHASES=pytest_all was accepted and ran no test (exit 0): the phase ran only when nothing was marked gpu
    result, calls, _ = _run_suite(tmp_path, SUITE_PHASES="pytest_all", GOAL_RESERVE_S="0")
    assert result.returncode == 0, result.stdout + result.stderr
    pytests = [c for c in calls if c.startswith("-m pytest")]
    assert len(pytests) == 1 and pytests[0].endswith("-rA tests"), pytests
    assert "no test is marked gpu" not in result.stdout


def test_gpu_suite_stops_at_once_without_a_gpu(tmp_path):
    """No GPU visible (nvidia-smi fails) and no BENCH_DEVICE=cpu: one line saying so and exit 2, before anything
    is built, tested or written (it used to print "nvidia-smi failed" and rebuild the CUDA extension in place)."""
    result, calls, out = _run_suite(tmp_path, gpu=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no GPU visible (nvidia-smi failed); BENCH_DEVICE=cpu for a CPU smoke run" in result.stderr
    assert calls == [] and not out.exists()
    (tmp_path / "typo").mkdir()
    result, calls, _ = _run_suite(tmp_path / "typo", BENCH_DEVICE="gpu")
    assert result.returncode == 2 and "BENCH_DEVICE=gpu: expected cuda (the default) or cpu" in result.stderr
    assert calls == []


def test_gpu_suite_stops_at_once_where_torch_sees_no_gpu(tmp_path):
    """nvidia-smi lists a GPU that torch cannot use (CUDA_VISIBLE_DEVICES="", a CPU-only torch, an old driver): the
    import phase took the CPU-only library for one missing its CUDA kernels and rebuilt it with nvcc (minutes)."""
    result, calls, out = _run_suite(tmp_path, FAKE_NO_TORCH_CUDA="1")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "nvidia-smi lists a GPU but torch" in result.stderr and "torch.cuda.is_available() is False" in (
        result.stderr) and "BENCH_DEVICE=cpu for a CPU smoke run" in result.stderr, result.stderr
    assert len(calls) == 1 and "torch.cuda.is_available" in calls[0] and not out.exists(), calls


def test_gpu_suite_cpu_smoke_run_without_a_gpu(tmp_path):
    """BENCH_DEVICE=cpu runs where nvidia-smi fails: the benchmarks with --device cpu --quick, the first use in the
    interpreter with dry launches, and no rebuild for CUDA kernels (DEEPLAB_OPS_CUDA defaults to 0)."""
    env_log = tmp_path / "env.txt"
    result, calls, _ = _run_suite(tmp_path, gpu=False, BENCH_DEVICE="cpu", GOAL_RESERVE_S="0",
                                  FAKE_ENV_LOG=str(env_log))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nvidia-smi failed" in result.stdout  # the suite's GPU line says so, and the suite goes on
    benches = [c for c in calls if c.startswith("benchmarks/") and "_bench.py" in c]
    assert benches and all("--device cpu" in c for c in benches), benches
    assert all("--quick" in c for c in benches if "overhead_bench.py" not in c)
    assert any("--r50-step --dry-launches" in c for c in benches)
    assert set(env_log.read_text().splitlines()) == {"DEEPLAB_OPS_CUDA=0"}  # every python the suite started
    assert not any(c.startswith("setup.py") for c in calls)  # no build
    # the smoke run checks the suite's plumbing: two test files without workers (the interpreter's triton tests
    # took the whole pytest_gpu cap and ended TIMEOUT), and no compile of the whole R50 in train_more (60-85 s a case)
    pytests = [c for c in calls if c.startswith("-m pytest")]
    assert pytests and all(c.endswith("tests/test_budgets.py tests/test_suite_setup.py") and " -n " not in c
                           for c in pytests), pytests
    more = next(c for c in benches if "train_bench_more" in c)
    assert "--providers eager,triton " in more, more
    # every provider and dtype the smoke run asks for is one its script runs on a CPU: the CUDA-graph replays
    # (cuda-graph, triton-graph) had become "cpu-graph" and tf32 stayed in, and both phases (aspp_goal, aspp_dtypes)
    # stopped on a flag error (aspp_goal's goals then had no rows)
    import importlib

    for call in benches:
        words = call.split()
        module = importlib.import_module(words[0].split("/")[1].removesuffix(".py"))
        if "--providers" in words:
            providers = words[words.index("--providers") + 1].split(",")
            assert all(p in module.PROVIDERS and "graph" not in p and "cuda" not in p for p in providers), call
        if "--dtypes" in words:
            assert "tf32" not in words[words.index("--dtypes") + 1].split(","), call
    assert any("aspp_goal" in c and "--providers eager,eager-cl,eager-amp,eager-cl-amp,cpu,triton,compile,"
               "compile-max " in c for c in benches), benches


@pytest.mark.parametrize("knob, value", [("SUITE_BUDGET_S", "abc"), ("SUITE_BUDGET_S", "9m"), ("GOAL_RESERVE_S", "x"),
                                         ("PYTEST_GPU_S", "1.5"), ("PYTEST_WORKERS", "auto"),
                                         ("BENCH_MARGIN_S", "-3")])
def test_gpu_suite_refuses_a_number_knob_that_is_not_a_whole_number(tmp_path, knob, value):
    # SUITE_BUDGET_S=abc skipped every phase ("unbound variable") and exited 0; GOAL_RESERVE_S=x aborted mid-run
    # with no summary, no archive, and the stage folder left behind
    result, calls, out = _run_suite(tmp_path, **{knob: value})
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"gpu_suite: {knob}={value}: expected a whole number" in result.stderr
    assert calls == [] and not out.exists()
    assert not list(tmp_path.glob("gpu_suite.*"))


def test_gpu_suite_asks_for_plots_only_where_matplotlib_is_installed(tmp_path):
    # --plot was always passed: without matplotlib every benchmark said so after its run, and no NAME.png came back
    (tmp_path / "with").mkdir()
    (tmp_path / "without").mkdir()
    _, with_, _ = _run_suite(tmp_path / "with")
    _, without, _ = _run_suite(tmp_path / "without", FAKE_NO_MATPLOTLIB="1")
    benches = [[c for c in calls if c.startswith("benchmarks/") and "_bench.py" in c and "overhead_bench" not in c]
               for calls in (with_, without)]
    assert benches[0] and all(" --plot " in c for c in benches[0]), benches[0]
    assert benches[1] and not any("--plot" in c for c in benches[1]), benches[1]


def test_gpu_suite_with_no_time_for_any_phase_fails(tmp_path):
    # SUITE_BUDGET_S=40: every phase SKIPPED, exit status 0, as if everything had been measured
    result, calls, _ = _run_suite(tmp_path, SUITE_BUDGET_S="10")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no phase ran (SUITE_BUDGET_S=10 left no time for any)" in result.stdout
    (tmp_path / "cap").mkdir()
    result, _, _ = _run_suite(tmp_path / "cap", PYTEST_GPU_S="5")
    assert "pytest_gpu: SKIPPED (its cap, 5s, is under the 20s a phase needs)" in result.stdout


def test_gpu_suite_runs_only_the_phases_named_in_suite_phases(tmp_path):
    # a second call on a warm GPU machine runs what the first had no time for
    result, calls, _ = _run_suite(tmp_path, SUITE_PHASES="conv_bn_relu,first_use", FAKE_TUNING="1",
                                  DEEPLAB_OPS_TUNING_CACHE="/the/users/folder")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not any(c.startswith("-m pytest") for c in calls), calls
    benches = [c for c in calls if c.startswith("benchmarks/") and "_bench.py" in c]
    assert len(benches) == 2 and "--name first_use" in benches[0] and "--name conv_bn_relu_bench" in benches[1]
    # the first use times its keys as a new user's first step does: an empty folder of kept winners of its own, in
    # the stage (packed); the other benchmarks keep theirs in the user's folder, else in the stage's tuning/
    first_use_folder = benches[0].split("[tuning: ")[1].rstrip("]")
    assert first_use_folder.startswith(f"{tmp_path}/gpu_suite.") and "/first_use_tuning." in first_use_folder
    assert benches[1].endswith("[tuning: /the/users/folder]"), benches[1]
    (tmp_path / "default").mkdir()
    _, calls, _ = _run_suite(tmp_path / "default", SUITE_PHASES="conv_bn_relu", FAKE_TUNING="1")
    (bench,) = [c for c in calls if c.startswith("benchmarks/") and "_bench.py" in c]
    assert bench.split("[tuning: ")[1].rstrip("]").startswith(f"{tmp_path}/default/gpu_suite."), bench
    assert bench.endswith("/tuning]"), bench
    assert "-m deeplab_ops" in calls  # import and info always run
    assert "aspp_goal (not in SUITE_PHASES)" in result.stdout
    (tmp_path / "typo").mkdir()
    result, calls, _ = _run_suite(tmp_path / "typo", SUITE_PHASES="conv_bn_relu,firstuse")
    assert result.returncode == 2 and not calls
    assert "gpu_suite: SUITE_PHASES=conv_bn_relu,firstuse: no phase 'firstuse'; expected names from:" in result.stderr


@pytest.mark.parametrize("module, argv, message", [
    ("aspp_bench", ["--threads", "-1"], "argument --threads: must be >= 1 (torch CPU threads), got -1"),
    ("aspp_bench", ["--threads", "two"], "argument --threads: expected an integer >= 1 (torch CPU threads), got 'two'"),
    ("aspp_bench", ["--batches", "4,-2"], "argument --batches: must be >= 1 (a batch size), got -2"),
    ("aspp_bench", ["--in-channels", "0"], "argument --in-channels: must be >= 1 (channels), got 0"),
    ("aspp_bench", ["--out-channels", "-3"], "argument --out-channels: must be >= 1 (channels), got -3"),
    ("aspp_bench", ["--budget-s", "nan"], "argument --budget-s: must be a finite number of seconds >= 0, got nan"),
    ("aspp_bench", ["--budget-s", "-1"], "argument --budget-s: must be a finite number of seconds >= 0, got -1"),
    ("conv_bn_relu_bench", ["--out", "FILE"], "argument --out: FILE exists and is not a folder"),
    ("train_bench", ["--image-size", "8"], "argument --image-size: must be >= 16 (pixels: the largest output "
                                           "stride), got 8"),
    ("train_bench", ["--num-classes", "0"], "argument --num-classes: must be >= 1 (classes), got 0"),
    ("overhead_bench", ["--threads", "0"], "argument --threads: must be >= 1"),
    ("overhead_bench", ["--out", "FILE"], "argument --out: FILE exists and is not a folder"),
    ("overhead_bench", ["--step-batch", "1"], "argument --step-batch: must be >= 2 (images: training BatchNorm "
                                              "needs 2), got 1"),
    ("overhead_bench", ["--step-size", "4"], "argument --step-size: must be >= 16"),
    # the step's flags without --r50-step were ignored without a word (--dry-launches was already refused)
    ("overhead_bench", ["--step-size", "33"], "argument --step-size: needs --r50-step"),
    ("overhead_bench", ["--step-width", "8", "--step-dtype", "fp32"], "argument --step-width: needs --r50-step"),
    ("aspp_bench", ["--name", "sub/x"], "argument --name: 'sub/x' is not a file stem"),  # (a traceback after the run)
    ("conv_bn_relu_bench", ["--name", ""], "argument --name: '' is not a file stem"),
    ("overhead_bench", ["--name", ".hidden"], "argument --name: '.hidden' is not a file stem"),
    ("train_bench", ["--output-strides", "abc"], "argument --output-strides: expected a comma-separated list of "
                                                 "[8, 16], got 'abc'"),
    ("aspp_bench", ["--batches", "x"], "argument --batches: expected an integer >= 1 (a batch size), got 'x'"),
    # past torch's sizes: an overflow traceback (randn), and for --threads a crash of libgomp (100000 threads)
    ("aspp_bench", ["--batches", "2," + "9" * 20], f"argument --batches: must be <= 2147483647 (a batch size), got "
                                                   f"{'9' * 20}"),
    ("conv_bn_relu_bench", ["--batches", str(2**31)], "argument --batches: must be <= 2147483647 (a batch size)"),
    ("aspp_bench", ["--in-channels", "9" * 20], "argument --in-channels: must be <= 2147483647 (channels)"),
    ("aspp_bench", ["--threads", "100000"], "argument --threads: must be <= CPUS (torch CPU threads: this machine's "
                                            "logical CPUs), got 100000"),
    ("overhead_bench", ["--threads", "100000"], "argument --threads: must be <= CPUS (torch CPU threads: this "
                                                "machine's logical CPUs), got 100000"),
    # an item left out of a list ran the rest without a word
    ("aspp_bench", ["--providers", "eager,,cpu"], "argument --providers: an empty item in 'eager,,cpu': expected "
                                                  "names or numbers between the commas"),
    ("train_bench", ["--batches", "2,"], "argument --batches: an empty item in '2,'"),
    ("conv_bn_relu_bench", ["--name", " "], "argument --name: ' ' is not a file stem"),  # (it wrote " .json")
    ("aspp_bench", ["--name", "run "], "argument --name: 'run ' is not a file stem"),
])
def test_benchmark_flags_out_of_range_are_refused(module, argv, message, tmp_path, capsys):
    """A value the benchmark cannot use is a usage error naming the flag, not a silent default or a traceback."""
    existing = tmp_path / "results.csv"
    existing.write_text("kept\n")
    argv = [str(existing) if a == "FILE" else a for a in argv]
    message = message.replace("CPUS", str(os.cpu_count() or 1))
    with pytest.raises(SystemExit) as e:
        __import__(module).main(argv)
    assert e.value.code == 2
    assert message.replace("FILE", str(existing)) in capsys.readouterr().err
    assert existing.read_text() == "kept\n"


# ---- --out: a folder that cannot be made or written, result files that cannot be written ------------------------


def _no_work(monkeypatch):
    """Make any start of work fail the test: the argument checks must come first."""
    import overhead_bench

    def started(*args, **kwargs):
        raise AssertionError("the benchmark started work before refusing --out")

    monkeypatch.setattr(common, "matmul_peak", started)
    monkeypatch.setattr(common, "Runner", started)
    monkeypatch.setattr(overhead_bench, "run_case", started)
    monkeypatch.setattr(overhead_bench, "step_row", started)


SCRIPTS = ("aspp_bench", "conv_bn_relu_bench", "train_bench", "overhead_bench")


@pytest.mark.parametrize("module", SCRIPTS)
def test_out_that_cannot_be_created_is_refused_before_any_work(module, tmp_path, monkeypatch, capsys):
    """--out below a file, or where no folder can be made: a usage error naming --out (exit 2) before any case
    runs (it was a NotADirectoryError / FileNotFoundError traceback from write_results after the first case)."""
    _no_work(monkeypatch)
    afile = tmp_path / "afile"
    afile.write_text("kept\n")
    out = afile / "sub"
    with pytest.raises(SystemExit) as e:
        __import__(module).main([*QUICK, "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --out: cannot create the results folder {out}: {afile} is a file, not a folder" in err, err
    assert afile.read_text() == "kept\n"
    if Path("/proc").is_dir() and not Path("/proc/nope").exists():  # Linux: no folder can be made in /proc
        with pytest.raises(SystemExit) as e:
            __import__(module).main([*QUICK, "--out", "/proc/nope"])
        assert e.value.code == 2
        assert "argument --out: cannot create the results folder /proc/nope (in /proc)" in capsys.readouterr().err


@pytest.mark.parametrize("module, argv, taken", [
    ("aspp_bench", [], "aspp_bench.json"),
    ("aspp_bench", ["--plot"], "aspp_bench.png"),
    ("conv_bn_relu_bench", ["--name", "c"], "c.csv"),
    ("train_bench", ["--profile"], "train_bench_profile.txt"),
    ("overhead_bench", ["--name", "o"], "o.md"),
    ("overhead_bench", ["--name", "o"], "o.csv"),
])
def test_results_file_name_taken_by_a_folder_is_refused(module, argv, taken, tmp_path, monkeypatch, capsys):
    """A folder with the name of a result file (NAME.json, .csv, .png, _profile.txt; overhead_bench: NAME.csv,
    NAME.md) in --out: a usage error before any case runs (it was an IsADirectoryError after the first case)."""
    _no_work(monkeypatch)
    (tmp_path / taken).mkdir()
    with pytest.raises(SystemExit) as e:
        __import__(module).main([*QUICK, "--out", str(tmp_path), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --out: {tmp_path / taken} is a folder: the results file {taken} cannot be written" in err, err


# ---- more usage errors before any case runs: tf32 on the CPU, an empty --out, a --name too long, --plot ---------


@pytest.mark.parametrize("module, argv, flag", [
    ("aspp_bench", ["--dtypes", "fp32,tf32"], "--dtypes"),
    ("conv_bn_relu_bench", ["--dtypes", "tf32"], "--dtypes"),
    ("train_bench", ["--dtypes", "tf32"], "--dtypes"),
    ("overhead_bench", ["--dtype", "tf32"], "--dtype"),
    ("overhead_bench", ["--r50-step", "--step-dtype", "tf32"], "--step-dtype"),
])
def test_tf32_on_the_cpu_is_a_usage_error(module, argv, flag, tmp_path, monkeypatch, capsys):
    """tf32 is float32 storage with TF32 tensor-core matmuls, a CUDA mode: `--device cpu --dtypes tf32` ran fp32 and
    wrote its rows as tf32 rows. A usage error naming the flag, the value and why, before anything runs."""
    _no_work(monkeypatch)
    with pytest.raises(SystemExit) as e:
        __import__(module).main([*QUICK, "--out", str(tmp_path / "out"), *argv])
    assert e.value.code == 2
    assert f"argument {flag}: tf32 needs --device cuda: TF32 is a CUDA matmul mode" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("module", SCRIPTS)
def test_an_empty_out_is_a_usage_error(module, tmp_path, monkeypatch, capsys):
    """`--out ''` was taken for the current folder (Path('') is '.'): the results landed wherever the script was
    started. A usage error naming --out."""
    _no_work(monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        __import__(module).main([*QUICK, "--out", ""])
    assert e.value.code == 2
    assert "argument --out: expected the results folder, got an empty value" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("module, argv, longest", [
    ("aspp_bench", [], ".json"),
    ("train_bench", ["--profile"], "_profile.txt"),
    ("overhead_bench", [], ".csv"),
])
def test_a_name_too_long_for_the_folder_is_a_usage_error(module, argv, longest, tmp_path, monkeypatch, capsys):
    """A --name whose files fit the folder's file names but not the temporary copy each write makes beside them
    (".NAME.json.<pid>.<random>.tmp") was an OSError (File name too long) at the first case's save, after the run
    had started. A usage error naming --name, its length and the most the folder (here not made yet: its parent's
    file system) admits for the longest file the run writes."""
    out = tmp_path / "out"
    limit = common.name_max(out)
    most = limit - len(longest) - common.TEMP_NAME_MARGIN
    _no_work(monkeypatch)
    with pytest.raises(SystemExit) as e:
        __import__(module).main([*QUICK, "--out", str(out), "--name", "n" * (most + 1), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --name: too long, {most + 1} bytes: at most {most} here (the longest results file, " \
           f"NAME{longest}," in err and f"{limit}-byte file names of {out}" in err, err
    assert not out.exists()


def test_the_longest_name_accepted_is_written_and_set_aside(tmp_path):
    """The longest --name the check lets through is written (atomic_write's temporary copy fits), and a rerun moves
    its files aside to NAME.prev-<time>.EXT, a longer name still."""
    import aspp_bench

    name = "n" * (common.name_max(tmp_path) - len(".json") - common.TEMP_NAME_MARGIN)
    argv = [*QUICK, "--out", str(tmp_path), "--name", name, "--providers", "eager", "--modes", "eval_fwd",
            "--budget-s", "0"]
    for _ in range(2):
        assert aspp_bench.main(argv) == 1  # nothing ran: the budget of 0 s records the case as skipped
    assert json.loads((tmp_path / f"{name}.json").read_text())["rows"][0]["status"] == "skipped"
    assert len(list(tmp_path.glob(f"{name}.prev-*"))) == 2  # the first run's .json and .csv


def test_name_max_asks_the_nearest_folder_there_and_falls_back_to_255(tmp_path, monkeypatch):
    import os

    assert common.name_max(tmp_path / "not" / "made") == os.pathconf(tmp_path, "PC_NAME_MAX")

    def no_answer(path, name):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "pathconf", no_answer)
    assert common.name_max(tmp_path) == 255


@pytest.mark.parametrize("module", ["aspp_bench", "train_bench"])
def test_plot_without_matplotlib_is_a_usage_error(module, tmp_path, monkeypatch, capsys):
    """--plot where matplotlib is not installed ran every case, then said on stderr that NAME.png was not written
    (and exited 0): a usage error naming --plot, before anything runs."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "matplotlib" else find_spec(name, *a, **k))
    _no_work(monkeypatch)
    with pytest.raises(SystemExit) as e:
        __import__(module).main([*QUICK, "--out", str(tmp_path / "out"), "--plot"])
    assert e.value.code == 2
    assert "argument --plot: needs matplotlib, which is not installed here" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- --help names every default -------------------------------------------------------------------------------


def _help_options(text: str) -> dict[str, str]:
    """argparse --help text -> {option: its entry (invocation and help)} for the options that take a value."""
    entries, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (?:-\w, )?(--[\w-]+)( [^\s-]\S*)?", line)
        if m:
            current = m[1] if m[2] else None  # a switch (--quick) has no value, so no default to name
            if current:
                entries[current] = line
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("module", SCRIPTS)
def test_help_names_every_default(module, capsys):
    """docs/benchmarks.md: "--help lists every flag with its default": every option that takes a value says its
    default (--out, --batches, --modes, --output-strides, --step-width, --num-classes ... said nothing)."""
    with pytest.raises(SystemExit) as e:
        __import__(module).main(["--help"])
    assert e.value.code == 0
    entries = _help_options(capsys.readouterr().out)
    assert {"--device", "--out", "--name", "--threads", "--budget-s"} <= set(entries), entries
    missing = {flag: entry for flag, entry in entries.items() if not re.search(r"\bdefault\b", entry)}
    assert not missing, missing


# ---- python benchmarks/common.py goals / roofline: one line and a nonzero exit for what it cannot read ----------


def test_roofline_of_a_file_that_is_not_results(tmp_path, capsys):
    """roofline on a Markdown file (was KeyError 'status'), an empty file (was a lone header, exit 0), a corrupt
    JSON, a results file without aspp or conv_bn_relu rows: one line on stderr, exit 1."""
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    corrupt = tmp_path / "aspp_bench.json"
    corrupt.write_text('{"rows": [')
    train = tmp_path / "train.csv"
    with train.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=common.FIELDS)
        writer.writeheader()
        writer.writerow({**dict.fromkeys(common.FIELDS, ""), "op": "deeplabv3", "provider": "eager", "status": "ok",
                         "mode": "eval_fwd", "dtype": "fp32", "shape": "deeplabv3_r50 os16 17x17", "batch": "2",
                         "median_ms": "5"})
    for path, message in [(ROOT / "benchmarks" / "results" / "README.md", "not a benchmark results file: no op, "),
                          (empty, "empty, expected a results CSV with a header line"),
                          (corrupt, "not valid JSON"),
                          (train, "no aspp or conv_bn_relu row with status ok (1 rows")]:
        assert common.main(["roofline", str(path)]) == 1, path
        out = capsys.readouterr()
        assert out.out == "" and out.err.count("\n") == 1, out
        assert out.err.startswith(f"benchmarks/common.py roofline: {path}: {message}"), out.err
    assert common.main(["roofline", str(tmp_path / "none.csv")]) == 1
    assert capsys.readouterr().err == f"benchmarks/common.py roofline: No such file or directory: {tmp_path}/none.csv\n"


def test_roofline_of_a_markdown_file_as_a_script():
    # the command a new user typed: one line, no traceback
    result = subprocess.run([sys.executable, str(BENCH_DIR / "common.py"), "roofline",
                             str(ROOT / "benchmarks" / "results" / "README.md")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "not a benchmark results file" in result.stderr and result.stdout == ""


def test_goals_of_a_folder_that_is_not_there_or_not_results(tmp_path, capsys):
    """goals DIR: a folder that is not there (or a file) is one line, exit 1 (it printed "no aspp_goal.json" lines,
    exit 0); a corrupt aspp_goal.json is reported in the goals' lines and on stderr, exit 1 (was a JSONDecodeError
    traceback), the other file's goals still reported; a folder with neither file: exit 1."""
    assert common.main(["goals", str(tmp_path / "nonexistent")]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err == f"benchmarks/common.py goals: no such results folder: {tmp_path}/nonexistent\n"
    (tmp_path / "file").write_text("x")
    assert common.main(["goals", str(tmp_path / "file")]) == 1
    assert capsys.readouterr().err == f"benchmarks/common.py goals: not a folder: {tmp_path}/file\n"
    assert common.main(["goals", str(tmp_path)]) == 1
    out = capsys.readouterr()  # one line on stderr; nothing on stdout (it printed 7 "no aspp_goal.json" lines there)
    assert "no aspp_goal.json nor train_bench.json here" in out.err and out.out == "" and out.err.count("\n") == 1
    (tmp_path / "aspp_goal.json").write_text('{"rows": [{"op": "aspp"')
    (tmp_path / "train_bench.json").write_text(json.dumps({"meta": {}, "rows": [
        {"op": "deeplabv3", "provider": p, "mode": "train_step", "dtype": "bf16", "shape": "s", "batch": 2,
         "status": "ok", "median_ms": ms, "gpu": "none (CPU: x)", "peak_mem_mb": None}
        for p, ms in (("eager", 3.0), ("cpu", 2.0))]}))
    assert common.main(["goals", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "ASPP train forward vs best eager: cannot read aspp_goal.json: not valid JSON (" in out.out
    assert "training step vs best eager (images/s) [s, bf16, N2, none (CPU: x)]: cpu 1.50x vs eager" in out.out
    assert out.err.startswith(f"benchmarks/common.py goals: {tmp_path}/aspp_goal.json: not valid JSON (")
    (tmp_path / "aspp_goal.json").write_text(json.dumps([1, 2]))
    assert common.main(["goals", str(tmp_path)]) == 1
    assert "not a results JSON" in capsys.readouterr().err


def test_goals_say_when_no_fused_row_ran(tmp_path, capsys):
    """train_bench.py --device cpu --quick --providers eager,eager-cl,eager-amp --dtypes bf16: eager rows only. The
    training-step goal's line says there is no fused row to compare (it was missing altogether)."""
    rows = [{"op": "deeplabv3", "provider": p, "mode": "train_step", "dtype": "bf16", "shape": "s", "batch": 2,
             "status": "ok", "median_ms": ms, "gpu": "none (CPU: x)", "peak_mem_mb": None}
            for p, ms in (("eager", 3.0), ("eager-cl", 2.0), ("eager-amp", 4.0))]
    (tmp_path / "train_bench.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    assert common.main(["goals", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert ("training step vs best eager (images/s) [s, bf16, N2, none (CPU: x)]: no cuda / triton / cpu row (nor "
            "their -cl / -lean forms) to compare with eager-cl (ran: eager, eager-cl, eager-amp)") in lines, lines


# ---- gpu_suite.sh from another folder, its goals phase, Ctrl-C -------------------------------------------------------

def test_gpu_suite_started_from_another_folder_runs_from_the_repository_root(tmp_path):
    """`bash /path/to/benchmarks/gpu_suite.sh` from another folder ran every phase there: the import failed and
    tried setup.py, pytest found no tests, every benchmark was "can't open file benchmarks/...". The phases now run
    from the repository root; a relative OUT is still taken from the folder the suite was started in."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result, calls, _ = _run_suite(tmp_path, cwd=elsewhere, OUT="results", FAKE_PWD="1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert calls and {c.split(" | ")[0] for c in calls} == {str(BENCH_DIR.parent)}, calls
    assert any("benchmarks/aspp_bench.py" in c for c in calls)
    assert (elsewhere / "results" / "suite.log").is_file() and not (BENCH_DIR.parent / "results").exists()


def test_gpu_suite_reports_a_goals_report_that_failed(tmp_path):
    """The goals phase piped `common.py goals` into tee, whose status was the phase's: a report that could not be
    made (no aspp_goal.json) was summarized as "ok goals". It is FAILED now, as every phase that fails."""
    result, _, _ = _run_suite(tmp_path, FAKE_GOALS_FAIL="1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED   goals (rc 1" in result.stdout


def test_gpu_suite_cpu_smoke_run_times_the_cpu_backend(tmp_path):
    """BENCH_DEVICE=cpu ran the GPU run's provider lists on the CPU: cuda, cuda-cl and cuda-lean were skipped
    (no CUDA tensors) and triton too (no interpreter), so no fused provider was timed and every line of goals.txt
    said "no cuda / triton / cpu row". The smoke run times the cpu backend in their place."""
    result, calls, _ = _run_suite(tmp_path, BENCH_DEVICE="cpu", GOAL_RESERVE_S="0")
    assert result.returncode == 0, result.stdout + result.stderr
    providers = [c.split("--providers ")[1].split()[0] for c in calls if "--providers " in c]
    assert len(providers) >= 5, calls  # the two goal benchmarks, train_more, conv_bn_relu, the ASPP sweeps
    assert not any("cuda" in p for p in providers), providers
    assert {"cpu", "cpu-lean", "cpu-cl"} <= {p for ps in providers for p in ps.split(",")}, providers


SLOW_BENCH_PYTHON = """#!/usr/bin/env bash
echo "$PWD | $*" >> "$FAKE_LOG"
case "$*" in
    *aspp_bench.py*) prev=; for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
                     echo '{"meta": {"partial": true}, "rows": []}' > "$out/aspp_goal.json"
                     echo started >> "$FAKE_LOG.started"; sleep 60 ;;
esac
exit 0
"""


@pytest.mark.parametrize("how", ["ctrl-c", "term", "term-group"])
def test_ctrl_c_of_gpu_suite_stops_the_phase_and_keeps_what_it_wrote(tmp_path, how):
    """A terminal's Ctrl-C reached the suite's shells but not the running phase (timeout runs it in a process group
    of its own): the suite sat until the phase ended (minutes), its tee had died, and it removed its staging folder
    without packing anything: every result of the run was lost. Now the phase gets the SIGINT at once, the phases
    left are skipped, and $OUT holds the logs and the tar.gz as after a full run; exit status 130."""
    import os
    import signal
    import time

    fake = tmp_path / "python"
    fake.write_text(SLOW_BENCH_PYTHON)
    fake.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'GPU 0: Stand-in GPU (UUID: GPU-0)'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    log, out = tmp_path / "calls.txt", tmp_path / "out"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": str(fake), "FAKE_LOG": str(log),
           "TMPDIR": str(tmp_path), "GIT_COMMIT": "abc1234", "OUT": str(out)}
    suite = subprocess.Popen(["bash", str(BENCH_DIR / "gpu_suite.sh")], cwd=BENCH_DIR.parent, env=env,
                             start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "calls.txt.started").exists():  # the aspp_goal phase is running
            assert time.monotonic() < deadline and suite.poll() is None, "the aspp_goal phase did not start"
            time.sleep(0.1)
        if how == "ctrl-c":
            os.killpg(suite.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the foreground process group
        elif how == "term-group":  # `timeout`, `docker stop`, a scheduler: TERM to the whole group, which ended the
            os.killpg(suite.pid, signal.SIGTERM)  # suite's tee, and the suite at its next line (nothing packed)
        else:  # `kill PID`, a CI cancel: the suite's own process only (main ran in a pipeline's subshell, which the
            suite.send_signal(signal.SIGTERM)  # TERM did not reach: every phase ran on and the suite exited 0)
        stdout, _ = suite.communicate(timeout=40)  # the phase sleeps 60 s: it must not be waited for
    finally:
        if suite.poll() is None:
            os.killpg(suite.pid, signal.SIGKILL)
            suite.wait()
    assert suite.returncode == 130, stdout
    assert "INTERRUPTED aspp_goal" in stdout and "SKIPPED  train_goal (interrupted)" in stdout, stdout
    assert not any("train_bench.py" in c for c in log.read_text().splitlines())
    names = sorted(p.name for p in out.iterdir())
    assert {"suite.log", "gpu_suite_results.tar.gz", "aspp_goal.json"} <= set(names) and len(names) <= 8, names
    assert "gpu_suite: interrupted" in (out / "suite.log").read_text()
    assert not list(tmp_path.glob("gpu_suite.*"))  # the staging folder is removed, its files packed


def test_gpu_suite_never_writes_over_an_earlier_runs_results(tmp_path):
    """OUT unset wrote into ./bench_out, and an OUT that held an earlier run's files had suite.log, aspp_goal.json,
    train_bench.json, goals.txt and the tar.gz replaced (and the at-most-8-files count no longer held). A folder that
    holds files is refused before anything runs; unset, each run gets a folder of its own."""
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "aspp_goal.json").write_text("an earlier run's\n")
    for run in ("a", "b", "c"):
        (tmp_path / run).mkdir()
    result, calls, _ = _run_suite(tmp_path / "a", OUT=str(kept))
    assert result.returncode == 2 and "already holds files" in result.stderr and not _work(calls), result.stderr
    assert (kept / "aspp_goal.json").read_text() == "an earlier run's\n" and len(list(kept.iterdir())) == 1
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for run in ("b", "c"):
        result, _, _ = _run_suite(tmp_path / run, cwd=elsewhere, OUT="")
        assert result.returncode == 0, result.stdout + result.stderr
    runs = sorted((elsewhere / "bench_out").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("gpu_suite-") and (r / "suite.log").is_file() for r in runs)


def test_results_readme_names_the_folder_the_suite_makes_when_out_is_unset(tmp_path):
    """benchmarks/results/README.md said the suite writes to ./bench_out when OUT is unset; it makes a folder of its
    own per run, ./bench_out/gpu_suite-<UTC time>. The README's name for it is the one a run makes."""
    readme = (BENCH_DIR / "results" / "README.md").read_text()
    said = re.search(r"`\./bench_out/gpu_suite-(YYYYMMDD-HHMMSS)`", readme)
    assert said and "./bench_out when unset" not in readme
    elsewhere = tmp_path / "elsewhere"
    for folder in (tmp_path / "run", elsewhere):
        folder.mkdir()
    result, _, _ = _run_suite(tmp_path / "run", cwd=elsewhere, OUT="")
    assert result.returncode == 0, result.stdout + result.stderr
    (made,) = (elsewhere / "bench_out").iterdir()
    assert re.fullmatch(r"gpu_suite-\d{8}-\d{6}", made.name), made.name


@pytest.mark.parametrize("kind", ["file", "under-a-file"])
def test_gpu_suite_refuses_an_out_that_is_no_folder(tmp_path, kind):
    """OUT naming a file (or a folder under one): mkdir failed unchecked and OUT became '' after the cd, so the logs
    and the tar.gz went to /."""
    (tmp_path / "run").mkdir()
    taken = tmp_path / "taken"
    taken.write_text("the user's file\n")
    out = taken if kind == "file" else taken / "sub"
    result, calls, _ = _run_suite(tmp_path / "run", OUT=str(out))
    assert result.returncode == 2 and "cannot be created or entered" in result.stderr and not _work(calls), (
        result.stderr)
    assert taken.read_text() == "the user's file\n"


def test_common_help_is_usage_on_stdout_and_exit_0(capsys):
    """python benchmarks/common.py --help exited 2 with the one-line usage on stderr, as for a wrong command line;
    the four benchmark scripts' --help exit 0."""
    for flag in ("--help", "-h"):
        assert common.main([flag]) == 0
        out = capsys.readouterr()
        assert out.out.startswith("usage: python benchmarks/common.py goals DIR") and out.err == "", out
        assert all(f"  {command} " in out.out for command in ("goals", "roofline", "commit")), out.out
    assert common.main(["--bogus"]) == 2 and capsys.readouterr().err.startswith("usage:")

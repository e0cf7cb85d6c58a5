"""The benchmarks' numbers against independent computations: tap and FLOP counts by brute force (numpy over output
pixels and taps, and a convolution of ones), FLOPs against torch.utils.flop_counter over the timed call, minimum
bytes against the tensors the timed call really reads and writes, roofline bounds against the datasheet figures
docs/benchmarks.md states, speedups against rows picked by hand, and the committed H200 results."""

from __future__ import annotations

import csv
import itertools
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode

BENCH_DIR = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import common  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


# ---- tap counts: brute force ----------------------------------------------------------------------------------


def _out_size(size: int, k: int, d: int, p: int, s: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _taps_numpy(h: int, w: int, k: int, d: int, p: int, s: int) -> tuple[int, int]:
    """(useful, dense) by brute force: for every tap, the output pixels (a 2-d grid, not per axis) whose input pixel
    is inside the h x w image."""
    ho, wo = _out_size(h, k, d, p, s), _out_size(w, k, d, p, s)
    oy, ox = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")
    useful = 0
    for i in range(k):
        for j in range(k):
            iy, ix = oy * s - p + i * d, ox * s - p + j * d
            useful += int(np.count_nonzero((iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)))
    return useful, k * k * ho * wo


def _taps_by_convolution(h: int, w: int, k: int, d: int, p: int, s: int) -> int:
    """Useful taps another way: a convolution of an all-ones image with an all-ones kernel, zero padding, sums
    one per (output pixel, tap) pair that reads inside the image."""
    ones = torch.ones(1, 1, h, w, dtype=torch.float64)
    out = torch.nn.functional.conv2d(ones, torch.ones(1, 1, k, k, dtype=torch.float64), stride=s, padding=p,
                                     dilation=d)
    return int(out.sum().item())


# (h, w, kernel, dilation, padding, stride): square and non-square maps, stride 2 and 3, dilation, rates larger
# than the map (only the centre tap reads inside it), padding other than "same"
SHAPES = [
    (9, 9, 3, 1, 1, 1), (9, 13, 3, 1, 1, 2), (129, 129, 3, 1, 1, 2), (65, 65, 3, 1, 1, 1), (33, 33, 1, 1, 0, 1),
    (33, 33, 3, 2, 2, 1), (33, 33, 3, 4, 4, 1), (33, 33, 3, 6, 6, 1), (33, 33, 3, 18, 18, 1), (33, 33, 3, 24, 24, 1),
    (33, 33, 3, 36, 36, 1), (65, 65, 3, 36, 36, 1), (17, 17, 3, 40, 40, 1), (9, 17, 3, 12, 12, 1),
    (17, 9, 3, 12, 12, 2), (12, 7, 5, 2, 3, 2), (10, 15, 3, 3, 0, 3), (8, 8, 3, 3, 1, 2), (33, 65, 1, 1, 0, 2),
    (5, 40, 3, 6, 6, 2),
]


@pytest.mark.parametrize(("h", "w", "k", "d", "p", "s"), SHAPES)
def test_conv_taps_and_flops_against_brute_force(h, w, k, d, p, s):
    useful, dense = _taps_numpy(h, w, k, d, p, s)
    assert useful == _taps_by_convolution(h, w, k, d, p, s)
    assert common.conv_taps(h, w, k, d, p, s) == (useful, dense)
    n, cin, cout = 3, 5, 7
    assert common.conv_flops(n, cin, cout, h, w, k, d, p, s) == (2.0 * n * cin * cout * useful,
                                                                   2.0 * n * cin * cout * dense)


@pytest.mark.parametrize("size", [5, 9, 17, 33, 65])
def test_valid_tap_fraction_against_brute_force(size):
    for rate in (1, 2, 3, 6, 12, 18, 24, 36, 64, 100):
        useful, dense = _taps_numpy(size, size, 3, rate, rate, 1)
        assert common.valid_tap_fraction(size, rate) == pytest.approx(useful / dense, rel=1e-15), (size, rate)


# ---- ASPP FLOPs: every branch --------------------------------------------------------------------------------


def _aspp_flops_brute(n, cin, cout, h, w, rates):
    """(useful, dense) forward FLOPs of ASPP from the brute-force tap counts: the 1x1 branch, each 3x3 branch
    (padding = dilation = rate), the pooling branch's 1x1 conv on the pooled 1x1 map, and the projection over the
    (R+2)·C_out concatenation; useful counts the projection's pooled slice once per image (a constant over the
    map: docs/benchmarks.md), dense at every pixel."""
    hw = h * w
    mac = 2.0 * n * cin * cout
    useful = dense = mac * hw + mac  # 1x1 branch, pooling branch
    for r in rates:
        u, d = _taps_numpy(h, w, 3, r, r, 1)
        useful, dense = useful + mac * u, dense + mac * d
    proj = 2.0 * n * cout * cout
    useful += proj * (len(rates) + 1) * hw + proj
    dense += proj * (len(rates) + 2) * hw
    return useful, dense


ASPP_CASES = [(2, 8, 4, 9, 9, (2, 4, 6)), (3, 6, 5, 11, 7, (3, 12, 20)), (2, 4, 4, 5, 13, (1,)),
              (2, 16, 8, 17, 17, (6, 12, 18)), (2, 4, 3, 9, 9, (12, 24, 36))]


@pytest.mark.parametrize(("n", "cin", "cout", "h", "w", "rates"), ASPP_CASES)
def test_aspp_flops_count_every_branch(n, cin, cout, h, w, rates):
    assert common.aspp_flops(n, cin, cout, h, w, rates) == pytest.approx(_aspp_flops_brute(n, cin, cout, h, w, rates),
                                                                         rel=1e-12)


def _counted(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize(("n", "cin", "cout", "h", "w", "rates"), ASPP_CASES[:3])
def test_aspp_dense_flops_are_what_the_timed_call_runs(n, cin, cout, h, w, rates):
    """flop_counter over the benchmark's own eager ASPP call, as mode_case builds it: dense forward, and fwd_bwd
    3x forward because mode_case computes the input's gradient (without it the dgrad of every branch is missing)."""
    import aspp_bench

    torch.manual_seed(0)
    forward = common.aspp_flops(n, cin, cout, h, w, rates)
    for mode in common.MODES:
        module = aspp_bench.eager_aspp(cin, rates, cout)
        fn, _ = common.mode_case(mode, module, [torch.randn(n, cin, h, w)])
        assert _counted(fn) == common.mode_flops(forward, mode)[1], mode
    # without the input gradient, forward + backward is less than 3x: the benchmark must (and does) compute it
    module = aspp_bench.eager_aspp(cin, rates, cout).train()
    x = torch.randn(n, cin, h, w)
    assert _counted(lambda: module(x).sum().backward()) < 3 * forward[1]


def test_conv_bn_relu_dense_flops_are_what_the_timed_call_runs():
    import conv_bn_relu_bench as bench

    for s in (*bench.QUICK_CPU_SHAPES, bench.ConvShape("os16", "layer2", 4, 6, 3, 11, stride=2),
              bench.ConvShape("aspp", "aspp", 4, 3, 3, 9, dilation=12)):
        forward = common.conv_flops(2, s.cin, s.cout, s.size, s.size, s.kernel, s.dilation, s.padding, s.stride)
        for mode in common.MODES:
            x = torch.randn(2, s.cin, s.size, s.size)
            inputs = [x] + ([torch.randn(2, s.cout, s.out_size, s.out_size)] if s.residual else [])
            fn, _ = common.mode_case(mode, bench.EagerConvBNReLU(s), inputs)
            assert _counted(fn) == common.mode_flops(forward, mode)[1], (s, mode)


# ---- minimum bytes: the tensors the timed call touches --------------------------------------------------------


def _grads_written(module: torch.nn.Module, inputs) -> int:
    return sum(t.grad.numel() for t in [*module.parameters(), *inputs] if t.grad is not None)


@pytest.mark.parametrize("residual", [True, False])
def test_conv_bn_relu_min_bytes_match_the_tensors_of_the_call(residual):
    """min_bytes counts, per docs/benchmarks.md, reading every parameter and BN buffer, the input and the residual,
    writing out; fwd_bwd also writes a gradient for x, the weight, BN's weight and bias and the residual: the timed
    fwd_bwd call must compute each of those gradients (in DeepLab the residual, like x, comes from the backbone),
    or the bound counts bytes the call never moves."""
    import conv_bn_relu_bench as bench

    s = (bench.ConvShape("os16", "layer3", 6, 10, 1, 7, residual=True) if residual
         else bench.ConvShape("os16", "layer2", 6, 5, 3, 9, stride=2, dilation=2))
    n = 2
    module = bench.EagerConvBNReLU(s)
    x = torch.randn(n, s.cin, s.size, s.size)
    res = [torch.randn(n, s.cout, s.out_size, s.out_size)] if s.residual else []
    out_numel = n * s.cout * s.out_size * s.out_size
    params = sum(p.numel() for p in module.parameters())
    stats = module.bn.running_mean.numel() + module.bn.running_var.numel()

    def b(mode):
        return common.conv_bn_relu_min_bytes(n, s.cin, s.cout, s.size, s.size, s.kernel, s.out_size, s.out_size,
                                             s.residual, mode, 1)

    read_fwd = x.numel() + params + stats + sum(t.numel() for t in res)
    assert b("eval_fwd") == read_fwd + out_numel
    assert b("train_fwd") == read_fwd + out_numel + stats  # the running statistics written back
    fn, grads = common.mode_case("fwd_bwd", module, [x, *res])
    fn()
    written = _grads_written(module, [x, *res])
    assert written == x.numel() + params + sum(t.numel() for t in res)  # every input's gradient
    assert all(any(t is g for g in grads) for t in [x, *res])  # ... each cleared by the timer between calls
    # backward reads grad_out, x, weight, out and BN's weight
    read_bwd = out_numel + x.numel() + module.conv.weight.numel() + out_numel + module.bn.weight.numel()
    assert b("fwd_bwd") == b("train_fwd") + read_bwd + written


def test_aspp_min_bytes_match_the_tensors_of_the_call():
    import aspp_bench

    n, cin, cout, h, w, rates = 2, 6, 4, 7, 9, (2, 5, 11)
    module = aspp_bench.eager_aspp(cin, rates, cout)
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == len(rates) + 3 == len(bns)  # 1x1, the 3x3 branches, pooling, projection: each with BN
    weights = sum(c.weight.numel() for c in convs)
    assert all(c.bias is None for c in convs)
    bn = sum(v.numel() for m in bns for v in (m.weight, m.bias, m.running_mean, m.running_var))
    x_numel, out_numel = n * cin * h * w, n * cout * h * w

    def b(mode):
        return common.aspp_min_bytes(n, cin, cout, h, w, rates, mode, 1)

    assert b("eval_fwd") == x_numel + weights + bn + out_numel
    assert b("train_fwd") == b("eval_fwd") + bn // 2
    x = torch.randn(n, cin, h, w)
    fn, _ = common.mode_case("fwd_bwd", module, [x])
    fn()
    written = _grads_written(module, [x])
    assert written == x_numel + weights + bn // 2
    read_bwd = out_numel + x_numel + weights + out_numel + sum(m.weight.numel() for m in bns)
    assert b("fwd_bwd") == b("train_fwd") + read_bwd + written


# ---- roofline: the datasheet figures docs/benchmarks.md states ------------------------------------------------

# docs/benchmarks.md: dense TFLOP/s (bf16 = fp16, tf32, fp32 on CUDA cores with TF32 off) and HBM TB/s
DATASHEET = {
    "NVIDIA H200": ((989, 494, 67), 4.8), "NVIDIA H100 80GB HBM3": ((989, 494, 67), 3.35),
    "NVIDIA H100 PCIe": ((756, 378, 51), 2.0), "NVIDIA H100 NVL": ((835, 418, 60), 3.9),
    "NVIDIA H200 NVL": ((835, 418, 60), 4.8), "NVIDIA A100-SXM4-80GB": ((312, 156, 19.5), 2.039),
    "NVIDIA A100 80GB PCIe": ((312, 156, 19.5), 1.935), "NVIDIA A100-SXM4-40GB": ((312, 156, 19.5), 1.555),
}


@pytest.mark.parametrize("gpu", sorted(DATASHEET))
def test_bound_and_pct_of_bound_use_the_dtypes_peak(gpu):
    (half, tf32, fp32), tbps = DATASHEET[gpu]
    peak = common.gpu_peak(gpu)
    flops, nbytes = 7.5e12, 1e9
    for dtype, tflops in (("bf16", half), ("fp16", half), ("tf32", tf32), ("fp32", fp32)):
        expected = max(flops / (tflops * 1e12), nbytes / (tbps * 1e12)) * 1e6
        assert common.roofline_bound_us(flops, nbytes, dtype, peak) == pytest.approx(expected, rel=1e-12)
        row = {"gpu": gpu, "dtype": dtype, "median_ms": 40.0}
        common.fill_roofline(row, flops, nbytes)
        assert row["bound_us"] == pytest.approx(expected, rel=1e-12)
        assert row["pct_of_bound"] == pytest.approx(100 * expected / 40e3, rel=1e-12)
        # memory-bound: bytes alone
        assert common.roofline_bound_us(1.0, 48e9, dtype, peak) == pytest.approx(48e9 / (tbps * 1e12) * 1e6)


def test_h200_aspp_roofline_of_the_committed_rows():
    """`roofline` on the committed H200 ASPP goal rows: FLOPs, bytes and bound recomputed here from scratch."""
    n, cin, cout, size, rates = 16, 2048, 256, 33, (6, 12, 18)
    useful = _aspp_flops_brute(n, cin, cout, size, size, rates)[0]
    weights = cin * cout * (2 + 9 * len(rates)) + (len(rates) + 2) * cout * cout
    bn = 4 * cout * (len(rates) + 3)
    fwd = n * cin * size * size + weights + bn + n * cout * size * size
    x, out = n * cin * size * size, n * cout * size * size
    train_bytes = 2 * (fwd + bn // 2)
    # backward: read grad_out, x, the weights, out and BN's weights; write grad_x, the weights' and BN's gradients
    fwd_bwd_bytes = train_bytes + 2 * ((out + x + weights + out + bn // 4) + (x + weights + bn // 2))
    path = RESULTS / "2026-11-28-h200-aspp_goal.csv"
    rows = [r for r in csv.DictReader(path.open()) if r["status"] == "ok"]
    lines = common.roofline_report(path)[1:]
    assert len(lines) == len(rows) == 9
    for r, line in zip(rows, lines, strict=True):
        k = 3 if r["mode"] == "fwd_bwd" else 1
        flops = k * useful
        nbytes = train_bytes if k == 1 else fwd_bwd_bytes
        bound = max(flops / 989e12, nbytes / 4.8e12) * 1e6
        cells = line.split()
        assert float(cells[-4]) == pytest.approx(flops / 1e9, rel=1e-3)
        assert float(cells[-2]) == pytest.approx(bound, rel=2e-3)
        assert float(cells[-1]) == pytest.approx(100 * bound / (float(r["median_ms"]) * 1e3), abs=0.051)
        assert float(cells[-3]) == pytest.approx(nbytes / 1e6, rel=1e-3)


# ---- speedups: the rows of one case ---------------------------------------------------------------------------


def test_speedups_pick_the_rows_of_the_same_case_and_skip_failed_ones():
    def row(provider, ms, status="ok", **case):
        base = dict(op="aspp", mode="fwd_bwd", dtype="bf16", shape="s", batch=16)
        return dict.fromkeys(common.FIELDS) | base | case | dict(provider=provider, median_ms=ms, status=status)

    rows = [
        row("eager", 10.0), row("eager-cl", 8.0), row("eager-amp", 1.0, status="error"), row("compile", 5.0),
        row("compile-max", None, status="skipped"), row("cuda", 4.0),
        row("eager", 1.0, batch=8), row("eager-cl", 0.5, dtype="fp16"), row("compile", 0.1, mode="eval_fwd"),
        row("eager-cl-amp", 0.2, op="conv_bn_relu"),
    ]
    common.fill_speedups(rows)
    cuda = rows[5]
    assert (cuda["speedup_vs_eager"], cuda["anchor"], cuda["speedup_vs_anchor"], cuda["speedup_vs_compile"]) == (
        2.5, "eager-cl", 2.0, 1.25)
    assert rows[0]["anchor"] == "eager-cl" and rows[0]["speedup_vs_anchor"] == 0.8
    for failed in rows[2], rows[4]:
        assert all(failed[k] is None for k in ("speedup_vs_eager", "anchor", "speedup_vs_anchor",
                                               "speedup_vs_compile"))
    assert rows[6]["speedup_vs_anchor"] == 1.0 and rows[6]["speedup_vs_compile"] is None


def test_the_brute_force_covers_every_benchmark_shape():
    """The DeepLab shapes the scripts run (conv rows and ASPP branches) against the brute-force tap count."""
    import aspp_bench
    import conv_bn_relu_bench as bench

    for s in itertools.chain(bench.CUDA_SHAPES, bench.CPU_SHAPES, bench.QUICK_CPU_SHAPES):
        assert common.conv_taps(s.size, s.size, s.kernel, s.dilation, s.padding, s.stride) == _taps_numpy(
            s.size, s.size, s.kernel, s.dilation, s.padding, s.stride), s
    for configs in (aspp_bench.CUDA_CONFIGS, aspp_bench.CPU_CONFIGS, aspp_bench.QUICK_CPU_CONFIGS):
        for size, rates in configs.values():
            assert common.aspp_flops(1, 8, 4, size, size, rates) == pytest.approx(
                _aspp_flops_brute(1, 8, 4, size, size, rates), rel=1e-12)

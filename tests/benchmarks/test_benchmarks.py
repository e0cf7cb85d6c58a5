"""The benchmark scripts: FLOP counting, the shared helpers, and a `--device cpu --quick` run of each script."""

from __future__ import annotations

import csv
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT  # noqa: E402

BENCH_DIR = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import common  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_global_settings():
    # The scripts set cudnn.benchmark, TF32 and (--threads) the thread count; other tests must not see that.
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    threads = torch.get_num_threads()
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    torch.set_num_threads(threads)


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
    (33, (6, 12, 18), (0.77, 0.57, 0.41)),   # DESIGN.md, output stride 16
    (33, (12, 24, 36), (0.57, 0.27, 0.11)),  # DESIGN.md's 12/24/36 figures are at 33x33
    (65, (12, 24, 36), (0.77, 0.57, 0.40)),  # output stride 8: the feature map is 65x65
])
def test_valid_tap_fraction(size, rates, design):
    for r, expected in zip(rates, design, strict=True):
        # per axis, the centre tap reads size positions, each side tap max(0, size - r): the fraction is separable
        exact = ((size + 2 * max(0, size - r)) / (3 * size)) ** 2
        got = common.valid_tap_fraction(size, r)
        assert got == pytest.approx(exact, rel=1e-12)
        # DESIGN.md rounds to two digits; rate 18 at 33x33 is (63/99)^2 = 0.40496, which it gives as 0.41
        assert abs(got - expected) < 0.006, f"{size}x{size} rate {r}: {got:.4f}, DESIGN.md says {expected}"


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
    # the forward is dominated by the 3x3 branches: about 40% of their FLOPs multiply padding (DESIGN.md)
    assert 0.35 < 1 - conv3_useful / conv3_dense < 0.45
    assert common.mode_flops((useful, dense), "fwd_bwd") == (3 * useful, 3 * dense)
    assert common.mode_flops((useful, dense), "eval_fwd") == (useful, dense)


def test_quantile_matches_torch():
    values = torch.rand(11).tolist()
    for q in common.QUANTILES:
        assert math.isclose(common.quantile(values, q), torch.quantile(torch.tensor(values), q).item(), rel_tol=1e-5)


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
            assert 0 < r["useful_tflops"] <= r["dense_tflops"] and r["pct_peak"] > 0


def test_aspp_bench_cpu_quick(tmp_path, capsys):
    import aspp_bench

    argv = [*QUICK, "--out", str(tmp_path), "--providers", "cpu,reference,eager,cuda", "--plot"]
    assert aspp_bench.main(argv) == 0
    rows, meta = _read(tmp_path, "aspp_bench")
    _check_timed(rows, {"cpu", "reference", "eager"}, {"train_fwd", "eval_fwd", "fwd_bwd"})
    # the cuda backend cannot run CPU tensors: recorded as skipped with deeplab_ops' reason, never a crash
    cuda = [r for r in rows if r["provider"] == "cuda"]
    assert cuda and all(r["status"] == "skipped" and "CUDA tensors" in r["note"] for r in cuda)
    assert meta["matmul_peak_tflops"] > 0 and "valid_tap_fraction" in meta
    out = capsys.readouterr()
    assert "provider" in out.out and "skipped" in out.out
    (tmp_path / "aspp_bench.json").rename(tmp_path / "aspp_goal.json")
    goals = "\n".join(common.goal_report(tmp_path))
    assert "ASPP forward + backward vs eager [32x9x9 r2/4/6 ->16, fp32, N2" in goals and "(goal 1.6x)" in goals
    assert "no compile-max row" in goals and "no train_bench.json" in goals
    try:
        import matplotlib  # noqa: F401

        assert (tmp_path / "aspp_bench.png").stat().st_size > 0
    except ImportError:
        assert "matplotlib is not installed" in out.err


def test_conv_bn_relu_bench_cpu_quick(tmp_path):
    import conv_bn_relu_bench

    assert conv_bn_relu_bench.main([*QUICK, "--out", str(tmp_path)]) == 0
    rows, _ = _read(tmp_path, "conv_bn_relu_bench")
    _check_timed(rows, {"cpu", "reference", "eager"}, {"train_fwd", "eval_fwd", "fwd_bwd"})
    assert any("+res" in r["shape"] for r in rows)


def test_train_bench_cpu_quick(tmp_path):
    import train_bench

    # two providers keep this short: each call is a whole ResNet-50 step
    assert train_bench.main([*QUICK, "--providers", "cpu,eager,cpu-lean", "--out", str(tmp_path)]) == 0
    rows, _ = _read(tmp_path, "train_bench")
    _check_timed(rows, {"cpu", "eager", "cpu-lean"}, {"train_step", "eval_fwd"})
    assert all(r["images_per_s"] > 0 for r in rows)


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
    assert "triton-lean memory 0.50x, speed 1.10x met" in lines[0] and "test GPU" in lines[0]
    assert "cuda-lean memory 0.70x, speed 1.10x NOT met" in lines[1]


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
    assert "ASPP eval forward vs eager: no eval_fwd row ran in aspp_goal.json" in lines
    assert any(line.startswith("ASPP train forward vs eager [s") and "cuda 1.00x" in line for line in lines)


# ---- gpu_suite.sh, driven by a stand-in python that records its calls ----------------------------------------------

FAKE_PYTHON = """#!/usr/bin/env bash
args="$*"
echo "${args//$'\\n'/ }" >> "$FAKE_LOG"
if [ "$1 $2" = "-m pytest" ] && [ -n "${FAKE_NO_GPU_TESTS:-}" ] && [[ " $* " == *" -m gpu "* ]]; then exit 5; fi
exit 0
"""


def _run_suite(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, list[str], Path]:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log, out = tmp_path / "calls.txt", tmp_path / "out"
    full_env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": str(fake), "FAKE_LOG": str(log),
                "OUT": str(out), "TMPDIR": str(tmp_path), "GIT_COMMIT": "abc1234", **env}
    result = subprocess.run(["bash", str(BENCH_DIR / "gpu_suite.sh")], cwd=BENCH_DIR.parent, env=full_env,
                            capture_output=True, text=True, timeout=120)
    return result, log.read_text().splitlines(), out


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
    assert calls.index(next(c for c in calls if c.startswith("benchmarks/common.py goals"))) < benches[2]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"suite.log", "gpu_suite_results.tar.gz"} <= set(files), files
    assert "commit abc1234" in (out / "suite.log").read_text()


def test_gpu_suite_runs_the_whole_suite_when_nothing_is_marked_gpu(tmp_path):
    result, calls, _ = _run_suite(tmp_path, FAKE_NO_GPU_TESTS="1", GOAL_RESERVE_S="0")
    assert result.returncode == 0, result.stdout + result.stderr
    pytests = [c for c in calls if c.startswith("-m pytest")]
    assert len(pytests) == 2 and pytests[1].endswith("-rA tests"), pytests  # no -m: the whole suite
    assert "no test is marked gpu" in result.stdout

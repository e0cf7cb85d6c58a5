"""What every benchmark script shares: FLOP counting, timing, peak memory, result rows, writers, table, plots.

Timing: on CUDA `triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])` (median, p20, p80 in ms, L2 flushed
between calls by do_bench); on CPU a wall-clock loop with the same quantiles (do_bench needs a GPU), the providers of
a case interleaved call by call (Runner.group, interleaved_times).
Peak memory: `torch.cuda.max_memory_allocated` over one call after a reset (so it includes the inputs and
weights that are alive during the call); on CPU it is not measured (None, empty in CSV).
FLOPs: "useful" counts the (kernel tap, output position) pairs whose input position lies inside the image;
"dense" counts every tap, padding included: what an implicit-GEMM or cuDNN convolution computes.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import csv
import datetime
import errno
import importlib.machinery
import importlib.util
import io
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def _add_repository_root() -> None:
    """`model/` and an uninstalled deeplab_ops live at the repository root: put it first on sys.path where its
    deeplab_ops is built (in place, or an editable install's) or none is installed; after the installed packages
    where a regular install (pip install .) has deeplab_ops with its _C and the source tree has none, so that the
    benchmarks run the installed build instead of stopping on the source tree's missing _C."""
    if str(REPO_ROOT) in sys.path:
        return
    built = any((REPO_ROOT / "deeplab_ops" / f"_C{suffix}").is_file()  # (deeplab_ops._extension's rule)
                for suffix in importlib.machinery.EXTENSION_SUFFIXES)
    if built or importlib.util.find_spec("deeplab_ops") is None:
        sys.path.insert(0, str(REPO_ROOT))
    else:
        sys.path.append(str(REPO_ROOT))


_add_repository_root()

QUANTILES = (0.5, 0.2, 0.8)

# One schema for every script's rows: JSON rows and CSV columns, in this order.
FIELDS = (
    "op", "provider", "mode", "dtype", "shape", "batch", "status", "median_ms", "p20_ms", "p80_ms",
    "useful_tflops", "dense_tflops", "pct_peak", "speedup_vs_eager", "anchor", "speedup_vs_anchor",
    "speedup_vs_compile", "min_bytes", "flops", "bound_us", "pct_of_bound", "images_per_s", "peak_mem_mb",
    "setup_s", "note", "device", "gpu", "torch", "triton", "git_commit", "time",
)
ENV_FIELDS = ("device", "gpu", "torch", "triton", "git_commit", "time")

# dtype names: fp32 runs with TF32 off, tf32 is float32 storage with TF32 tensor-core math on.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
MODES = ("train_fwd", "eval_fwd", "fwd_bwd")

# The eager setups users run: NCHW with the model cast to the dtype (eager), channels_last (eager-cl), autocast over
# an fp32 model (eager-amp: torchvision's reference training with --amp), and both (eager-cl-amp). The fastest of
# them that ran is each case's anchor (speedup_vs_anchor); compile providers are compared apart (speedup_vs_compile).
EAGER_PROVIDERS = ("eager", "eager-cl", "eager-amp", "eager-cl-amp")
COMPILE_PROVIDERS = ("compile", "compile-max")
AMP_DTYPES = ("bf16", "fp16")


# ---- FLOP counting --------------------------------------------------------------------------------------------


def valid_positions(size: int, out_size: int, offset: int, stride: int = 1) -> int:
    """How many output positions o in [0, out_size) read an input index o*stride + offset inside [0, size)."""
    # o*stride + offset >= 0  <=>  o >= ceil(-offset / stride) = -(offset // stride)
    lo = max(0, -(offset // stride))
    hi = min(out_size - 1, (size - 1 - offset) // stride)
    return max(0, hi - lo + 1)


def conv_taps(h: int, w: int, kernel: int, dilation: int = 1, padding: int = 0, stride: int = 1) -> tuple[int, int]:
    """(useful, dense) tap counts of a square k×k conv on an h×w image: useful taps read inside the image."""
    ho = (h + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    rows = sum(valid_positions(h, ho, i * dilation - padding, stride) for i in range(kernel))
    cols = sum(valid_positions(w, wo, j * dilation - padding, stride) for j in range(kernel))
    return rows * cols, kernel * kernel * ho * wo


def valid_tap_fraction(size: int, rate: int) -> float:
    """Fraction of a 3×3 atrous conv's taps (dilation = padding = rate) that land inside a size×size image."""
    useful, dense = conv_taps(size, size, 3, rate, rate)
    return useful / dense


def conv_flops(n: int, cin: int, cout: int, h: int, w: int, kernel: int, dilation: int = 1, padding: int = 0,
               stride: int = 1) -> tuple[float, float]:
    """(useful, dense) forward FLOPs of a conv: 2·Cin·Cout per tap."""
    useful, dense = conv_taps(h, w, kernel, dilation, padding, stride)
    return 2.0 * n * cin * cout * useful, 2.0 * n * cin * cout * dense


def aspp_flops(n: int, cin: int, cout: int, h: int, w: int, rates: Sequence[int]) -> tuple[float, float]:
    """(useful, dense) forward FLOPs of ASPP: 1×1 branch, 3×3 atrous branches, pooling branch, projection.

    Dense counts the projection over the materialized (R+2)·Cout concat, pooling slice included; useful counts the
    pooling slice once per image (it is constant over H×W: a bias). BN, ReLU and the average pool are not counted.
    """
    hw = h * w
    useful = dense = 2.0 * n * cin * cout * hw  # 1×1 branch
    for r in rates:
        u, d = conv_flops(n, cin, cout, h, w, 3, r, r)
        useful, dense = useful + u, dense + d
    pool = 2.0 * n * cin * cout
    branches = len(rates) + 1
    useful += pool + 2.0 * n * branches * cout * cout * hw + 2.0 * n * cout * cout
    dense += pool + 2.0 * n * (branches + 1) * cout * cout * hw
    return useful, dense


def mode_flops(forward: tuple[float, float], mode: str) -> tuple[float, float]:
    """FLOPs of a mode: forward + backward is 3× forward (dgrad and wgrad each cost one forward)."""
    k = 3.0 if mode == "fwd_bwd" else 1.0
    return forward[0] * k, forward[1] * k


# ---- roofline: minimum HBM bytes, and the time bound they and the FLOPs imply on a known GPU ---------------------

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "tf32": 4}


def conv_bn_relu_min_bytes(n: int, cin: int, cout: int, h: int, w: int, kernel: int, out_h: int, out_w: int,
                           residual: bool, mode: str, elem: int) -> int:
    """The fewest HBM bytes conv + BatchNorm (+ residual) + ReLU can move in a mode: each tensor the call must read
    or write, once (docs/benchmarks.md, "Roofline").

    Forward: read x, weight, residual, BN's weight, bias, running mean and var; write out (and, training, the
    running mean and var). fwd_bwd adds the backward: read grad_out, x, weight, out (ReLU mask, BN rebuild) and BN's
    weight; write grad_x, grad_weight, grad of BN's weight and bias, grad_residual.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    x, wt, out = n * cin * h * w, cout * cin * kernel * kernel, n * cout * out_h * out_w
    res = out if residual else 0
    elems = x + wt + res + 4 * cout + out + (2 * cout if mode != "eval_fwd" else 0)
    if mode == "fwd_bwd":
        elems += (out + x + wt + out + cout) + (x + wt + 2 * cout + res)
    return elems * elem


def aspp_min_bytes(n: int, cin: int, cout: int, h: int, w: int, rates: Sequence[int], mode: str, elem: int) -> int:
    """The fewest HBM bytes the ASPP module can move in a mode: x, every weight and BN vector, out, once; the branch
    outputs (the (R+2)·Cout concat) never reach memory. fwd_bwd adds reading grad_out, x, the weights and out, and
    writing grad_x and every weight's gradient. A lower bound: a real ASPP writes (or recomputes) the concat."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    r = len(rates)
    weights = cin * cout * (2 + 9 * r) + (r + 2) * cout * cout  # 1x1, pooling 1x1, 3x3 branches, projection
    bn = 4 * cout * (r + 3)  # weight, bias, running mean, running var of every BatchNorm (branches + projection)
    x, out = n * cin * h * w, n * cout * h * w
    elems = x + weights + bn + out + (bn // 2 if mode != "eval_fwd" else 0)
    if mode == "fwd_bwd":
        elems += (out + x + weights + out + bn // 4) + (x + weights + bn // 2)
    return elems * elem


class GpuPeak(NamedTuple):
    """A card's dense peaks: TFLOP/s per benchmark dtype (fp32: CUDA cores, TF32 off) and HBM TB/s."""

    name: str
    tflops: dict
    hbm_tbps: float
    source: str


_HOPPER_SXM = {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}
_HOPPER_NVL = {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0}
_AMPERE = {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}
# Matched in order against torch.cuda.get_device_name(): the first whose every word is in the name. Numbers: NVIDIA's
# datasheets, dense (the datasheets' tensor-core figures are with 2:4 sparsity: halved here), boost clock.
GPU_PEAKS = (
    GpuPeak("H200 NVL", _HOPPER_NVL, 4.8, "NVIDIA H200 NVL datasheet (dense)"),
    GpuPeak("H200", _HOPPER_SXM, 4.8, "NVIDIA H200 SXM datasheet: bf16/fp16 989, tf32 494, fp32 67 TFLOP/s dense, "
                                      "HBM3e 4.8 TB/s"),
    GpuPeak("H100 NVL", _HOPPER_NVL, 3.9, "NVIDIA H100 NVL datasheet (dense)"),
    GpuPeak("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}, 2.0,
            "NVIDIA H100 PCIe datasheet (dense)"),
    GpuPeak("H100", _HOPPER_SXM, 3.35, "NVIDIA H100 SXM datasheet: bf16/fp16 989, tf32 494, fp32 67 TFLOP/s dense, "
                                       "HBM3 3.35 TB/s"),
    GpuPeak("A100 80GB PCIe", _AMPERE, 1.935, "NVIDIA A100 datasheet, 80GB PCIe (dense)"),
    GpuPeak("A100 80GB", _AMPERE, 2.039, "NVIDIA A100 datasheet, 80GB SXM: bf16/fp16 312, tf32 156, fp32 19.5 "
                                         "TFLOP/s dense, HBM2e 2.039 TB/s"),
    GpuPeak("A100", _AMPERE, 1.555, "NVIDIA A100 datasheet, 40GB (dense)"),
)


def gpu_peak(gpu_name: str | None) -> GpuPeak | None:
    """The peak table's entry for a device name ('NVIDIA H200', 'NVIDIA A100-SXM4-80GB'); None when unknown (CPUs)."""
    if not gpu_name or gpu_name.startswith("none"):
        return None
    words = set(gpu_name.upper().replace("-", " ").split())
    for peak in GPU_PEAKS:
        if set(peak.name.upper().split()) <= words:
            return peak
    return None


def roofline_bound_us(flops: float | None, min_bytes: float | None, dtype_name: str, peak: GpuPeak | None
                      ) -> float | None:
    """The time no kernel can beat, in µs: max(FLOPs / peak FLOP/s at the dtype, bytes / HBM bandwidth).
    None without a peak (or with neither count)."""
    if peak is None or (flops is None and min_bytes is None):
        return None
    compute = (flops or 0.0) / (peak.tflops[dtype_name] * 1e12) if dtype_name in peak.tflops else 0.0
    memory = (min_bytes or 0.0) / (peak.hbm_tbps * 1e12)
    return max(compute, memory) * 1e6


_ASPP_SHAPE = re.compile(r"^(\d+)x(\d+)x(\d+) r([\d/]+) ->(\d+)$")
_CONV_SHAPE = re.compile(r"^\S+ (\d+)->(\d+) k(\d+)(?: s(\d+))?(?: d(\d+))? @(\d+)( \+res)?$")


def row_counts(row: dict) -> tuple[float, int] | None:
    """(useful FLOPs, min_bytes) of an aspp or conv_bn_relu row, from its op, mode, dtype, batch and shape label
    (as aspp_bench and conv_bn_relu_bench write them): the roofline of results written before those columns.
    None for other ops or labels."""
    mode, elem, n = row["mode"], DTYPE_BYTES.get(row["dtype"]), int(row["batch"])
    if elem is None or mode not in MODES:
        return None
    if row["op"] == "aspp" and (m := _ASPP_SHAPE.match(row["shape"])):
        cin, h, w, cout = int(m[1]), int(m[2]), int(m[3]), int(m[5])
        rates = tuple(int(r) for r in m[4].split("/"))
        flops = mode_flops(aspp_flops(n, cin, cout, h, w, rates), mode)[0]
        return flops, aspp_min_bytes(n, cin, cout, h, w, rates, mode, elem)
    if row["op"] == "conv_bn_relu" and (m := _CONV_SHAPE.match(row["shape"])):
        cin, cout, k, size = int(m[1]), int(m[2]), int(m[3]), int(m[6])
        stride, dilation = int(m[4] or 1), int(m[5] or 1)
        padding = dilation * (k - 1) // 2
        out = (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1
        flops = mode_flops(conv_flops(n, cin, cout, size, size, k, dilation, padding, stride), mode)[0]
        return flops, conv_bn_relu_min_bytes(n, cin, cout, size, size, k, out, out, bool(m[7]), mode, elem)
    return None


# The columns a results file must have for `roofline` and `goals` to read its rows.
ROW_COLUMNS = ("op", "provider", "mode", "dtype", "shape", "batch", "status", "median_ms")


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a results file: NAME.json ({"meta", "rows"}) or NAME.csv (FIELDS columns). ValueError, saying
    what is wrong, for a file that is not one (not JSON, no "rows", a row or header without ROW_COLUMNS, empty);
    OSError for one that cannot be read."""
    return read_results(path)[0]


def read_results(path: str | Path) -> tuple[list[dict], dict]:
    """read_rows, and the run's meta: a JSON's "meta"; a CSV's is {"partial": True} when its last row says that the
    run had not finished (status PARTIAL_STATUS), else {}."""
    path = Path(path)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a text file") from None
        rows = data.get("rows") if isinstance(data, dict) else None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f'{path}: not a results JSON (expected {{"meta": ..., "rows": [...]}}, as the '
                             "benchmark scripts write)")
        missing = sorted({c for r in rows for c in ROW_COLUMNS if c not in r})
        meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    else:
        try:
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                rows, uneven = [], None  # uneven: the first row whose field count is not the header's
                for row in reader:
                    if uneven is None and (None in row or None in row.values()):
                        given = len(row) - 1 + len(row[None]) if None in row else sum(
                            v is not None for v in row.values())
                        uneven = (reader.line_num, given)
                    rows.append(row)
                header = reader.fieldnames
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a text file") from None
        except csv.Error as e:
            raise ValueError(f"{path}: not a results CSV ({e})") from None
        if not header:
            raise ValueError(f"{path}: empty, expected a results CSV with a header line ({', '.join(ROW_COLUMNS)}, "
                             "...)")
        missing = [c for c in ROW_COLUMNS if c not in header]
        if uneven and not missing:
            raise ValueError(f"{path}: line {uneven[0]} has {uneven[1]} fields, the header {len(header)} (a file cut "
                             "off or edited by hand? the benchmark scripts write every row whole)")
        meta = {"partial": True} if rows and rows[-1].get("status") == PARTIAL_STATUS else {}
    if missing:
        raise ValueError(f"{path}: not a benchmark results file: no {', '.join(missing)} column (expected the "
                         "NAME.csv or NAME.json of aspp_bench, conv_bn_relu_bench or train_bench)")
    return rows, meta


def roofline_report(path: str | Path) -> list[str]:
    """Lines: each ok row of a results CSV or JSON with its FLOPs, minimum bytes, bound on its GPU and % of it.
    ValueError when the file is not a results file or holds no ok aspp or conv_bn_relu row."""
    path = Path(path)
    rows = read_rows(path)
    lines = [f"{'provider':<13} {'mode':<10} {'dtype':<5} {'shape':<34} {'N':>3} {'ms':>9} {'GFLOP':>9} "
             f"{'min MB':>9} {'bound µs':>9} {'%bound':>7}"]
    for r in rows:
        try:
            counts = row_counts(r) if r["status"] == "ok" else None
            median = float(r["median_ms"]) if counts is not None else None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: a row's batch or median_ms is not a number ({e}): {r}") from None
        if median is not None and not _measured(median, positive=True):
            raise ValueError(f"{path}: a row's median_ms is {r['median_ms']!r}, not a finite number > 0: {r}")
        if counts is None:
            continue
        bound = roofline_bound_us(counts[0], counts[1], r["dtype"], gpu_peak(r.get("gpu")))
        pct = f"{100.0 * bound / (median * 1e3):7.1f}" if bound else f"{'-':>7}"
        lines.append(f"{r['provider']:<13} {r['mode']:<10} {r['dtype']:<5} {r['shape']:<34} {r['batch']:>3} "
                     f"{median:9.4g} {counts[0] / 1e9:9.4g} {counts[1] / 1e6:9.4g} "
                     f"{_fmt(bound) if bound else '-':>9} {pct}")
    if len(lines) == 1:
        raise ValueError(f"{path}: no aspp or conv_bn_relu row with status ok ({len(rows)} rows; the roofline is "
                         "computed for aspp_bench and conv_bn_relu_bench results)")
    return lines


# ---- environment ----------------------------------------------------------------------------------------------


def git_commit(root: str | Path = REPO_ROOT) -> str:
    """The project commit these numbers come from: $GIT_COMMIT when set, else HEAD of this project's repository
    (with +dirty when tracked files differ), else 'unknown'.

    $GIT_COMMIT wins: a copy made for another machine may have no .git, or sit inside another repository. When the
    enclosing repository's top level is not `root` (the folder holding benchmarks/), that repository is someone
    else's and its HEAD says nothing about this code: 'unknown'.
    """
    env = os.environ.get("GIT_COMMIT", "").strip()
    if env:
        return env

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)

    try:
        toplevel = git("rev-parse", "--show-toplevel").stdout.strip()
        if not toplevel or Path(toplevel).resolve() != Path(root).resolve():
            return "unknown"
        head = git("rev-parse", "HEAD").stdout.strip()
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Who ran: device, GPU (or CPU) name, torch and triton versions, git commit, UTC time."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = f"none (CPU: {cpu_name()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} threads)"
    return {
        "device": device.type,
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton_version,
        "git_commit": git_commit(),
        "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# The environment variables that change what a run measures without showing in its flags: the Triton interpreter
# (triton rows on CPU tensors, at the interpreter's pace), deeplab_ops' tuning (off: each key's first candidate, no
# timing in setup_s), the cpu backend's Winograd route (docs/kernels.md), and glibc's malloc thresholds (page faults
# of large CPU buffers: docs/performance.md). aspp_bench, conv_bn_relu_bench and train_bench record them in their
# meta (run_variables); overhead_bench puts the set ones on its rerun line and in its settings paragraph.
RUN_VARIABLES = ("TRITON_INTERPRET", "DEEPLAB_OPS_AUTOTUNE", "DEEPLAB_OPS_CPU_WINOGRAD", "GLIBC_TUNABLES")


def run_variables() -> dict[str, str | None]:
    """RUN_VARIABLES as this process sees them: {name: value}, None for one that is not set (so a reader can tell
    "unset" from a results file that predates the record)."""
    return {name: os.environ.get(name) for name in RUN_VARIABLES}


def machine_name(env: dict) -> str:
    """The machine a run's table titles name: the GPU's name, or on CPU the processor ("CPU: …", without the "none"
    that the gpu column holds there)."""
    gpu = env["gpu"]
    return gpu[len("none ("):-1] if gpu.startswith("none (") and gpu.endswith(")") else gpu


def header(env: dict) -> str:
    """The first line every benchmark prints: the machine, torch, triton and the commit."""
    return f"{machine_name(env)} | torch {env['torch']} | triton {env['triton']} | commit {env['git_commit']}"


def set_precision(dtype_name: str) -> torch.dtype:
    """Set TF32 for this dtype name (on only for 'tf32') and cuDNN autotuning; return the torch dtype."""
    if dtype_name not in DTYPES:
        raise ValueError(f"dtype {dtype_name!r} is not one of {tuple(DTYPES)}")
    tf32 = dtype_name == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    return DTYPES[dtype_name]


@contextlib.contextmanager
def precision(dtype_name: str):
    """set_precision(dtype_name) inside the block (yielding the torch dtype), the TF32 and cuDNN settings found on
    entry restored on exit: a part of a run with a dtype of its own (overhead_bench's --step-dtype beside --dtype)
    runs with its own TF32 setting and leaves the rest of the run's alone."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        yield set_precision(dtype_name)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


# ---- the eager setups ----------------------------------------------------------------------------------------


def uses_channels_last(provider: str) -> bool:
    """eager-cl, eager-cl-amp, the fused -cl setups (cpu-cl, ...) and train_bench's -lean ones (as train.py
    --fused-ops --memory-efficient trains: channels_last is its default with --fused-ops), and their -graph rows:
    module and input in channels_last."""
    provider = base_provider(provider)
    return provider.startswith("eager-cl") or provider in FUSED_CL_PROVIDERS or provider.endswith("-lean")


def uses_autocast(provider: str) -> bool:
    """eager-amp, eager-cl-amp: an fp32 module run under torch.autocast at the row's dtype."""
    return provider in EAGER_PROVIDERS and provider.endswith("-amp")


def eager_unavailable(provider: str, dtype_name: str) -> str:
    """Why an eager setup does not apply to this dtype ('' when it does): autocast runs bf16 or fp16 only."""
    if uses_autocast(provider) and dtype_name not in AMP_DTYPES:
        return (f"{provider} is autocast over an fp32 model: it runs {' or '.join(AMP_DTYPES)}, not {dtype_name} "
                "(the fp32 model itself is the eager row)")
    return ""


def prepare_eager(module: torch.nn.Module, provider: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The module as an eager setup runs it: fp32 under autocast, else cast to dtype; channels_last for -cl."""
    module = module.to(device=device, dtype=torch.float32 if uses_autocast(provider) else dtype)
    if uses_channels_last(provider):
        module = module.to(memory_format=torch.channels_last)
    return module


def prepare_input(x: torch.Tensor, provider: str) -> torch.Tensor:
    """A 4-d input in the provider's memory format (channels_last for the -cl setups; others unchanged)."""
    return x.contiguous(memory_format=torch.channels_last) if uses_channels_last(provider) and x.dim() == 4 else x


def autocast_dtype(provider: str, dtype_name: str) -> torch.dtype | None:
    """The autocast dtype of an -amp setup, None for every other provider."""
    return DTYPES[dtype_name] if uses_autocast(provider) else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast(device, dtype), or a no-op context when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---- timing and memory ----------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], object], device: torch.device, quick: bool = False,
          grad_to_none: Sequence[torch.Tensor] | None = None, warm: bool = False) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of fn(); on CPU, `warm` says fn already ran (no extra warm-up call)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        warmup, rep = (10, 30) if quick else (25, 100)
        # do_bench repeats for `rep` ms: long calls (a whole training step) would get one or two samples, so
        # stretch rep to cover at least 5 (quick) or 10 calls, up to 1.5 s (quick) or 4 s per case.
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        once_ms = (time.perf_counter() - start) * 1e3
        rep = min(max(rep, (5 if quick else 10) * once_ms), 1500 if quick else 4000)
        return tuple(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, quantiles=list(QUANTILES)))
    # CPU: warm-up calls first (oneDNN builds its primitives and the allocator grows on the first calls of a shape:
    # with one warm-up call the first provider of a case measured a few percent slow), then repetitions for at
    # least CPU_MIN_REPS calls and CPU_MIN_S seconds, at most CPU_MAX_REPS.
    warmups, min_reps, min_s, max_reps = cpu_loop(quick)
    for _ in range(warmups - 1 if warm else warmups):
        fn()
    times = []
    began = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - began < min_s):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return tuple(quantile(times, q) for q in QUANTILES)


CPU_WARMUP, CPU_MIN_REPS, CPU_MIN_S, CPU_MAX_REPS = 5, 10, 0.3, 300  # bench()'s CPU loop (not --quick)


def cpu_loop(quick: bool) -> tuple[int, int, float, int]:
    """(warm-up calls, least timed calls, least seconds, most timed calls) of the CPU timing loops."""
    return (1, 3, 0.0, 3) if quick else (CPU_WARMUP, CPU_MIN_REPS, CPU_MIN_S, CPU_MAX_REPS)


def interleaved_times(calls: Sequence[tuple[Callable[[], object], Sequence[torch.Tensor]]], quick: bool = False
                      ) -> list[list[float] | Exception]:
    """Per (fn, tensors whose .grad to clear) of `calls`, each fn having run once already: the milliseconds of its
    timed calls, or the exception that stopped it. CPU only. bench()'s loop for several functions at once: each
    gets CPU_WARMUP - 1 more warm-up calls (at least one: building a later case may have undone an earlier one's
    warm state, as torch._dynamo.reset() does to a compiled provider's graph), then rounds of one timed call each,
    the order rotating by one per round (no function always runs after the same other), for at least CPU_MIN_REPS
    rounds and CPU_MIN_S seconds per function, at most CPU_MAX_REPS rounds. A function that raises leaves the
    rotation; the others go on."""
    warmups, min_reps, min_s, max_reps = cpu_loop(quick)
    results: list[list[float] | Exception] = [[] for _ in calls]
    live = list(range(len(calls)))

    def timed(i: int, record: bool) -> None:
        fn, grads = calls[i]
        try:
            for t in grads:
                t.grad = None
            start = time.perf_counter()
            fn()
            if record:
                results[i].append((time.perf_counter() - start) * 1e3)
        except Exception as e:  # noqa: BLE001  (the caller turns it into the case's error row)
            results[i] = e
            live.remove(i)

    for i in list(live):
        for _ in range(max(1, warmups - 1)):
            if i in live:
                timed(i, record=False)
    rounds, began = 0, time.perf_counter()
    while live and rounds < max_reps and (rounds < min_reps or time.perf_counter() - began < min_s * len(live)):
        shift = rounds % len(live)
        for i in live[shift:] + live[:shift]:
            timed(i, record=True)
        rounds += 1
    return results


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (what torch.quantile and do_bench compute)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak allocated MiB during one fn() (live inputs and weights included); None on CPU (not measured)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def matmul_peak(device: torch.device, quick: bool = False) -> tuple[float, str]:
    """Measured matmul TFLOP/s, the denominator of pct_peak: bf16 n³ on CUDA, fp32 on CPU (bf16 is slow there)."""
    if device.type == "cuda":
        n, dtype = (4096 if quick else 8192), torch.bfloat16
    else:
        n, dtype = (512 if quick else 1024), torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = bench(lambda: a @ b, device, quick)[0]
    tflops = 2.0 * n**3 / (ms * 1e-3) / 1e12
    return tflops, f"{str(dtype).removeprefix('torch.')} {n}x{n}x{n} matmul on {device.type}: {tflops:.3g} TFLOP/s"


# ---- cases ---------------------------------------------------------------------------------------------------


def mode_case(mode: str, module: torch.nn.Module, inputs: Sequence[torch.Tensor], compiled: bool = False,
              amp: torch.dtype | None = None):
    """(fn, tensors whose .grad the timer clears) running `module(*inputs)` in one of MODES.

    train_fwd: train mode with autograd recording (as in a training step); eval_fwd: eval mode under no_grad;
    fwd_bwd: train mode, forward then backward with a fixed random output gradient, grads for every floating-point
    input too (x, and a conv's residual: in DeepLab both come from the backbone, and min_bytes counts both
    gradients). Compiled modules mark each call as a new CUDA-graph step. `amp`: the forward runs under
    torch.autocast at that dtype (the backward outside it, as PyTorch's AMP recipe does).
    """
    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None) if compiled else None
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    device = inputs[0].device
    module.train(mode != "eval_fwd")
    if mode == "eval_fwd":
        def fn():
            if mark:
                mark()
            with torch.no_grad(), autocast(device, amp):
                return module(*inputs)

        return fn, []
    if mode == "train_fwd":
        def fn():
            if mark:
                mark()
            with autocast(device, amp):
                return module(*inputs)

        return fn, []
    for t in inputs:
        if t.is_floating_point():
            t.requires_grad_(True)
    grad = []

    def fn():
        if mark:
            mark()
        with autocast(device, amp):
            out = module(*inputs)
        if not grad:
            grad.append(torch.randn_like(out))
        out.backward(grad[0])

    return fn, list(module.parameters()) + [t for t in inputs if t.requires_grad]


def allocate(make: Callable[..., object], *args, **kwargs) -> tuple[object, Exception | None]:
    """(make(*args, **kwargs), None), or (None, the exception it raised). For a case's inputs, which a script makes
    before the case is built (the backends' rules look at them to say whether a provider runs the call): a batch too
    large to allocate (out of memory, on the GPU or the CPU) must become that case's error row, as a failure inside
    its build does, not end the run with a traceback. Give the case failed_build(e) as its build."""
    try:
        return make(*args, **kwargs), None
    except (RuntimeError, MemoryError) as e:  # out of memory (torch.OutOfMemoryError is a RuntimeError), not a bug
        return None, e


def failed_build(e: Exception) -> Callable[[], tuple]:
    """A case's build that raises e (the exception that stopped allocate making its inputs): Runner.run turns it
    into the case's error row, the exception's first line in its note ("OutOfMemoryError: CUDA out of memory. ...",
    "RuntimeError: ... DefaultCPUAllocator: can't allocate memory ..."), and the run goes on with the next case."""

    def build() -> tuple:
        raise e

    return build


FUSED_PROVIDERS = ("triton", "cuda", "cpu", "reference")  # deeplab_ops backends, by name
# The fused modules with their weights and input channels_last (the layout train.py --fused-ops runs), beside the
# NCHW rows of the same backend: like for like with eager-cl.
FUSED_CL_PROVIDERS = ("triton-cl", "cuda-cl", "cpu-cl")


def fused_backend(provider: str) -> str | None:
    """The deeplab_ops backend a fused provider runs (cpu-cl -> cpu, triton-graph -> triton), None for eager and
    compile providers."""
    provider = base_provider(provider)
    if provider in FUSED_PROVIDERS:
        return provider
    return provider.removesuffix("-cl") if provider in FUSED_CL_PROVIDERS else None


# Another provider's case captured in one CUDA graph and replayed: what its kernels cost without the host work
# around them (Python, dispatch, launches), the floor that CUDA graphs (torch.cuda.graph, make_graphed_callables,
# torch.compile(mode="reduce-overhead")) let a user reach. eager-graph beside them: the same for eager PyTorch.
GRAPH_SUFFIX = "-graph"
GRAPH_PROVIDERS = ("eager-graph", "eager-cl-graph", "cuda-graph", "triton-graph", "cuda-cl-graph", "triton-cl-graph")


def base_provider(provider: str) -> str:
    """The provider whose case a -graph provider captures (triton-graph -> triton); others unchanged."""
    return provider.removesuffix(GRAPH_SUFFIX) if provider in GRAPH_PROVIDERS else provider


def graph_unavailable(provider: str, device: torch.device) -> str:
    """Why a -graph provider cannot run here ('' when it can, and for every other provider)."""
    if provider in GRAPH_PROVIDERS and device.type != "cuda":
        return f"{provider} replays a CUDA graph: it needs --device cuda"
    return ""


def graphed(case: tuple[Callable[[], object], list[torch.Tensor]], device: torch.device,
            warmups: int = 3) -> tuple[Callable[[], object], list[torch.Tensor]]:
    """A `mode_case` (fn, grads) captured in a CUDA graph: (replay, []).

    fn runs `warmups` times on a side stream first (Triton compiles and tunes there, cuDNN picks its algorithms), then
    the grads are set to None, as the timed calls of the other providers have them (so the captured backward writes
    each gradient rather than adding to one: the same work), and fn runs once under capture. Each replay runs the
    recorded kernels on the same memory: the forward's outputs, the running statistics' updates, the gradients (kept
    between replays: the list of grads to clear is empty). `replay` holds fn, and through it the module, its inputs
    and gradients: a graph does not keep the tensors it reads alive, and freed ones would be handed to others."""
    if device.type != "cuda":
        raise RuntimeError("a CUDA graph needs a CUDA device")
    fn, grads = case
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    for t in grads:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    synchronize(device)
    kept = (case, graph)

    def replay() -> None:
        kept[1].replay()

    replay.captured = kept  # (what the closure keeps alive, for a reader)
    return replay, []


def compiled(module: torch.nn.Module, provider: str) -> torch.nn.Module:
    """torch.compile for a compile provider (compile: default mode, compile-max: max-autotune), on a fresh dynamo
    state: each case compiles its own graph, so no recompile limit is reached and no case reuses another's guards."""
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(module, mode="max-autotune" if provider == "compile-max" else "default")


def unavailable(provider: str, op: str, device: torch.device, **call) -> str:
    """Why a provider cannot run this call of `op` here ('' when it can), in deeplab_ops' own words."""
    graph = graph_unavailable(provider, device)
    if graph:
        return graph
    backend = fused_backend(provider)
    if backend is not None:
        from deeplab_ops import backends

        return "; ".join(backends.not_supported_reasons(backend, op, device, **call))
    if provider.startswith("compile") and device.type == "cuda":
        from deeplab_ops.backends import triton_import_error

        return triton_import_error() or ""
    return ""


class Runner:
    """Runs cases and keeps their rows: skips (with the reason printed) what cannot or need not run.

    Cases submitted inside `with runner.group():` (the providers of one op, mode, dtype, shape and batch) are timed
    together. On the CPU they are built, warmed up, and then timed call by call in turn, the order rotating each
    round (interleaved_times): a shared machine's slow phases (up to 1.6x on this project's 2-core machine, minutes
    long) then fall on every provider of the case alike instead of on whichever ran during one. On a GPU they run one
    after another (do_bench measures device time, which host load does not shift).
    """

    def __init__(self, env: dict, device: torch.device, args: argparse.Namespace, peak_tflops: float | None,
                 meta: dict | None = None) -> None:
        self.env, self.device, self.args, self.peak = env, device, args, peak_tflops
        self.meta = meta or {}  # the run's meta (machine, versions, argv, ...): the partial saves carry it too
        self.budget = Budget(args.budget_s)
        self.rows: list[dict] = []
        # every file an earlier run of this NAME may have left, --plot or --profile or not: none describes this run
        claim_results(args.out, args.name)
        set_aside_earlier_results(args.out, [f"{args.name}{ext}" for ext in RESULT_SUFFIXES])
        self._group: list[tuple] | None = None  # the cases of the open CPU group, in submission order

    def skip(self, reason: str, **case) -> None:
        print(f"  skip {case.get('provider')} {case.get('mode')} {case.get('dtype')} {case.get('shape')} "
              f"N{case.get('batch')}: {reason}", flush=True)
        self.rows.append(make_row(self.env, status="skipped", note=reason, **case))
        self.save()

    def save(self) -> None:
        """Write the rows so far: a run killed by a timeout still leaves every finished case on disk."""
        fill_speedups(self.rows)
        write_results(self.rows, self.args.out, self.args.name, {**self.meta, "partial": True})

    @contextlib.contextmanager
    def group(self):
        """Time the cases run() is given inside together (interleaved on the CPU); their rows come in that order."""
        if self.device.type != "cpu" or self._group is not None:
            yield
            return
        self._group = []
        try:
            yield
            cases = self._group
        finally:
            self._group = None
        self._run_group(cases)

    def run(self, build, *, reason: str = "", flops=None, images=None, note: str = "", min_bytes: int | None = None,
            **case) -> dict | None:
        """Run one case unless `reason` (or a spent budget) says to skip it; returns its row (None inside a CPU
        group, whose rows are made when it closes)."""
        if not reason and self.budget.spent():
            reason = f"time budget of {self.args.budget_s:.0f} s spent"
        if self._group is not None:
            self._group.append((build, reason, dict(flops=flops, images=images, min_bytes=min_bytes), note, case))
            return None
        if reason:
            self.skip(reason, **case)
            return None
        row = run_case(self.env, build, self.device, quick=self.args.quick, flops=flops, peak_tflops=self.peak,
                       images=images, profile=self._profile_path(), min_bytes=min_bytes, **case)
        return self._keep(row, note, case)

    def _profile_path(self) -> Path | None:
        return Path(self.args.out) / f"{self.args.name}_profile.txt" if getattr(self.args, "profile", False) else None

    def _keep(self, row: dict, note: str, case: dict) -> dict:
        if note and not row["note"]:
            row["note"] = note
        self.rows.append(row)
        self.save()
        extra = f" {row['images_per_s']:.3g} img/s" if row.get("images_per_s") else ""
        print(f"  {case.get('provider'):<12} {case.get('mode'):<9} {case.get('dtype'):<4} N{case.get('batch'):<3} "
              f"{case.get('shape')}: {_fmt(row['median_ms'])} ms{extra} {row['status']}", flush=True)
        return row

    def _run_group(self, cases: list[tuple]) -> None:
        """Build each case and time its first call (setup_s), then time them all interleaved; rows in order."""
        built: list[tuple | dict | str] = []  # per case: (fn, grads, setup_s), an error row, or why it is skipped
        for build, reason, _, _, case in cases:
            if not reason and self.budget.spent():  # spent while the group's earlier cases were built
                reason = f"time budget of {self.args.budget_s:.0f} s spent"
            if reason:
                built.append(reason)
                continue
            try:
                start = time.perf_counter()
                fn, grads = build()
                fn()
                built.append((fn, grads, time.perf_counter() - start))
            except Exception as e:  # noqa: BLE001  (reported in the row and on stderr)
                built.append(error_row(self.env, e, case))
        timed = [b for b in built if isinstance(b, tuple)]
        times = iter(interleaved_times([(fn, grads) for fn, grads, _ in timed], self.args.quick))
        profile = self._profile_path()
        for (_, _, figures, note, case), b in zip(cases, built, strict=True):
            if isinstance(b, str):
                self.skip(b, **case)
                continue
            if isinstance(b, dict):
                self._keep(b, note, case)
                continue
            fn, grads, setup_s = b
            ms = next(times)
            if isinstance(ms, Exception):
                self._keep(error_row(self.env, ms, case), note, case)
                continue
            row = timed_row(self.env, fn, self.device, quick=self.args.quick, peak_tflops=self.peak, setup_s=setup_s,
                            times=ms, **figures, **case)
            if profile is not None:
                profile_safely(fn, self.device, profile, case)
            self._keep(row, note, case)


# ---- rows ----------------------------------------------------------------------------------------------------


def make_row(env: dict, **fields) -> dict:
    """A result row with every FIELDS key (missing ones None) and the environment columns."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise KeyError(f"unknown row fields {sorted(unknown)}; expected a subset of {FIELDS}")
    row = dict.fromkeys(FIELDS)
    row.update({k: env[k] for k in ENV_FIELDS})
    row.update(fields)
    return row


def timed_row(env: dict, fn: Callable[[], object], device: torch.device, *, quick: bool, flops: tuple[float, float]
              | None = None, peak_tflops: float | None = None, images: int | None = None,
              grad_to_none: Sequence[torch.Tensor] | None = None, setup_s: float | None = None,
              min_bytes: int | None = None, times: Sequence[float] | None = None, **fields) -> dict:
    """Time fn (or take the milliseconds `times` of its calls, timed elsewhere) and fill the figures of a row:
    times, TFLOP/s, % of peak, roofline, images/s, peak memory."""
    if times is not None:
        median, p20, p80 = (quantile(times, q) for q in QUANTILES)
    else:
        median, p20, p80 = bench(fn, device, quick, grad_to_none, warm=setup_s is not None)
    row = make_row(env, status="ok", median_ms=median, p20_ms=p20, p80_ms=p80, setup_s=setup_s, **fields)
    if flops is not None:
        row["useful_tflops"] = flops[0] / (median * 1e-3) / 1e12
        row["dense_tflops"] = flops[1] / (median * 1e-3) / 1e12
        if peak_tflops:
            row["pct_peak"] = 100.0 * row["useful_tflops"] / peak_tflops
    fill_roofline(row, flops[0] if flops is not None else None, min_bytes)
    if images is not None:
        row["images_per_s"] = images / (median * 1e-3)
    # (a graph's replay allocates nothing: its memory was taken at capture, so a peak over a replay says nothing)
    row["peak_mem_mb"] = None if fields.get("provider") in GRAPH_PROVIDERS else peak_memory_mb(fn, device)
    return row


def fill_roofline(row: dict, flops: float | None, min_bytes: int | None) -> None:
    """flops, min_bytes, bound_us (on a GPU of the peak table) and pct_of_bound (bound / median) of a row."""
    row["flops"], row["min_bytes"] = flops, min_bytes
    bound = roofline_bound_us(flops, min_bytes, row["dtype"], gpu_peak(row.get("gpu")))
    row["bound_us"] = bound
    row["pct_of_bound"] = 100.0 * bound / (row["median_ms"] * 1e3) if bound and row.get("median_ms") else None


def run_case(env: dict, build: Callable[[], tuple[Callable[[], object], list[torch.Tensor]]], device: torch.device,
             *, quick: bool, flops=None, peak_tflops=None, images=None, profile: Path | None = None,
             min_bytes: int | None = None, **fields) -> dict:
    """Build a case (returning fn and the tensors whose grads to clear), time its first call, then time it;
    with `profile`, append the case's top kernels (torch.profiler, 3 calls) and host table to that file.

    Any exception becomes a row with status 'error' and the message in note: one broken provider never stops a run.
    """
    try:
        start = time.perf_counter()
        fn, grads = build()
        fn()
        synchronize(device)
        setup_s = time.perf_counter() - start
        row = timed_row(env, fn, device, quick=quick, flops=flops, peak_tflops=peak_tflops, images=images,
                        grad_to_none=grads, setup_s=setup_s, min_bytes=min_bytes, **fields)
        if profile is not None:
            profile_safely(fn, device, profile, fields)
        return row
    except Exception as e:  # noqa: BLE001  (reported in the row and on stderr)
        return error_row(env, e, fields)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def error_row(env: dict, e: Exception, fields: dict) -> dict:
    """A case's row with status 'error' and the exception's first line in note (also printed on stderr; the
    traceback too with $BENCH_TRACEBACK): one broken provider never stops a run."""
    message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    print(f"  error in {fields.get('provider')} {fields.get('mode')} {fields.get('shape')}: {message}",
          file=sys.stderr)
    if os.environ.get("BENCH_TRACEBACK"):
        traceback.print_exception(e)
    return make_row(env, status="error", note=message[:300], **fields)


def profile_safely(fn: Callable[[], object], device: torch.device, path: Path, fields: dict) -> None:
    """profile_case under the case's title; a profiler failure is printed, never discards the timing."""
    title = " ".join(str(fields.get(k)) for k in ("provider", "mode", "dtype", "shape", "batch"))
    try:
        profile_case(fn, device, path, title)
    except Exception as e:  # noqa: BLE001
        print(f"  profiling {title} failed: {type(e).__name__}: {e}", file=sys.stderr)


def profile_case(fn: Callable[[], object], device: torch.device, path: Path, title: str, calls: int = 3) -> None:
    """Append the top operators and kernels of `calls` calls of fn, by device (else CPU) time, to path; then where
    the host's time goes (`host_profile`): whether a case is bound by its kernels or by the host work around them."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=70)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(f"==== {title} ({calls} calls)\n{table}\n")
    try:
        host = host_profile(fn, device, calls)
    except Exception as e:  # noqa: BLE001  (e.g. another profiler holds Python's profiling hook: the table stays)
        host = f"host profile failed: {type(e).__name__}: {e}\n"
    with path.open("a") as f:
        f.write(f"{host}\n")


def _short_path(filename: str) -> str:
    """A profiled function's file, from its package on: .../site-packages/triton/runtime/jit.py ->
    triton/runtime/jit.py, a file of this project from the repository root."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in filename:
            return filename.rsplit(marker, 1)[1]
    root = str(Path(__file__).resolve().parent.parent) + os.sep
    return filename.removeprefix(root)


def host_profile(fn: Callable[[], object], device: torch.device, calls: int = 3, rows: int = 15) -> str:
    """Where the host's time goes in `calls` calls of fn, as a text table:

    - host µs per call: the time the calls take to return, back to back after a synchronization and without one
      between them (on CUDA, the time to enqueue the work: when it is close to the case's GPU time the case is bound
      by its host work, not its kernels);
    - the same calls under cProfile (Python's profiler, which slows Python code, not C++ or the GPU): the functions
      with the most time of their own per call, Python and the C calls they make (a Triton launch, an aten op called
      from Python), with their calls per call and their cumulative time.
    """
    import cProfile
    import pstats

    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host_us = (time.perf_counter() - start) / calls * 1e6
    synchronize(device)
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        for _ in range(calls):
            fn()
    finally:
        profiler.disable()
    synchronize(device)
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (primitive calls, calls, tottime, cumtime, callers)
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:rows]
    total = sum(v[2] for v in stats.values())
    lines = [f"host: {host_us:.1f} µs per call without a profiler ({calls} calls, no synchronization between them); "
             f"under cProfile {total / calls * 1e6:.1f} µs per call, the functions with the most time of their own:",
             f"{'calls/call':>10}  {'own µs/call':>11}  {'cum µs/call':>11}  function"]
    for (filename, line, name), (_, ncalls, tottime, cumtime, _) in top:
        where = name if filename == "~" else f"{_short_path(filename)}:{line}({name})"
        lines.append(f"{ncalls / calls:>10.3g}  {tottime / calls * 1e6:>11.1f}  {cumtime / calls * 1e6:>11.1f}  "
                     f"{where[:110]}")
    return "\n".join(lines) + "\n"


def fill_speedups(rows: list[dict], key: Sequence[str] = ("op", "mode", "dtype", "shape", "batch")) -> None:
    """Per case (rows sharing `key`), from its 'ok' rows: speedup_vs_eager = eager (NCHW) median / this median;
    anchor = the fastest eager setup (EAGER_PROVIDERS) and speedup_vs_anchor = its median / this median;
    speedup_vs_compile = the fastest compile provider's median / this median."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "ok" and r.get("median_ms"):
            groups.setdefault(tuple(r[k] for k in key), []).append(r)
    for case in groups.values():
        eager = next((r for r in case if r["provider"] == "eager"), None)
        anchor = min((r for r in case if r["provider"] in EAGER_PROVIDERS), key=lambda r: r["median_ms"], default=None)
        comp = min((r for r in case if r["provider"] in COMPILE_PROVIDERS), key=lambda r: r["median_ms"],
                   default=None)
        for r in case:
            if eager:
                r["speedup_vs_eager"] = eager["median_ms"] / r["median_ms"]
            if anchor:
                r["anchor"] = anchor["provider"]
                r["speedup_vs_anchor"] = anchor["median_ms"] / r["median_ms"]
            if comp:
                r["speedup_vs_compile"] = comp["median_ms"] / r["median_ms"]


class Budget:
    """A wall-clock budget: once spent, the remaining cases are recorded as skipped instead of run."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.start = time.monotonic()

    def spent(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.start > self.seconds


# ---- output --------------------------------------------------------------------------------------------------


# The last row of the CSV of a run that has not finished (killed, interrupted, or still running): a CSV has no "meta"
# to say so, and without it the cases finished so far would look like the whole run.
PARTIAL_STATUS = "partial"
PARTIAL_WHY = "the run had not finished when this file was written (stopped, interrupted or still running)"
PARTIAL_NOTE = f"{PARTIAL_WHY}: the rows above are the cases finished so far"  # (the CSV's last row)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace path by a file holding text in one step (training.checkpoint.atomic_write: a temporary file in the
    same folder, then os.replace): a run killed while writing leaves the previous file whole, never half of one."""
    from training.checkpoint import atomic_write

    data = text.encode()
    atomic_write(str(path), lambda f: f.write(data))


def write_results(rows: list[dict], out_dir: str | Path, name: str, extra: dict | None = None) -> tuple[Path, Path]:
    """Write {name}.json ({"meta", "rows"}) and {name}.csv (FIELDS columns) under out_dir, each replaced in one step;
    return both paths. With extra["partial"] (the saves during a run) the CSV ends with a row of status
    PARTIAL_STATUS saying so (the JSON says it in its meta)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / f"{name}.json", out / f"{name}.csv"
    write_text_atomic(json_path, json.dumps({"meta": extra or {}, "rows": rows}, indent=1, default=str) + "\n")
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else _fmt_csv(r.get(k), k)) for k in FIELDS})
    if (extra or {}).get("partial"):
        writer.writerow({"status": PARTIAL_STATUS, "note": PARTIAL_NOTE})
    write_text_atomic(csv_path, buffer.getvalue())
    return json_path, csv_path


class ResultsBusy(RuntimeError):
    """Another run holds the claim on the same --out and --name (claim_results)."""


_CLAIMS: dict[Path, int | None] = {}  # lock file -> its descriptor (None: nothing locked here), per NAME written
_RELEASE_AT_EXIT: list[bool] = []  # atexit's release_results registered (once per process)


def claim_results(out_dir: str | Path, name: str) -> None:
    """Claim --out's NAME for this run before anything is moved aside or written: a second run with the same --out
    and --name while this one runs is refused (ResultsBusy) instead of moving this run's files aside and being
    replaced by them, or replacing them (the first run's rows were lost silently). An flock on OUT/.NAME.lock,
    dropped by the OS however the process ends; release_results removes the file. Where the platform or the
    filesystem has no flock, the NAME is recorded as this run's but not locked."""
    lock = Path(out_dir) / f".{name}.lock"
    if lock in _CLAIMS:
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    if not _RELEASE_AT_EXIT:
        atexit.register(release_results)
        _RELEASE_AT_EXIT.append(True)
    try:
        import fcntl
    except ImportError:  # (Windows)
        _CLAIMS[lock] = None
        return
    busy = ResultsBusy(f"another run is writing the results named {name!r} in {lock.parent} (it holds {lock.name}): "
                       "wait for it to finish, or give this one another --name or --out")
    for _ in range(8):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise busy from None
        except OSError:  # a filesystem without locks: unlocked, as before claims existed
            os.close(fd)
            with contextlib.suppress(OSError):
                lock.unlink()
            _CLAIMS[lock] = None
            return
        try:
            ours = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            ours = False
        if ours:
            _CLAIMS[lock] = fd
            return
        os.close(fd)  # the file a finishing run removed after this one opened it: lock the one there now
    raise busy


def release_results() -> None:
    """Drop this process's claims (claim_results), removing their lock files: at the end of a run, and at exit."""
    for lock, fd in list(_CLAIMS.items()):
        if fd is not None:
            with contextlib.suppress(OSError):
                lock.unlink()
            os.close(fd)
        del _CLAIMS[lock]


def set_aside_earlier_results(out_dir: str | Path, names: Iterable[str]) -> list[tuple[Path, Path]]:
    """Before a run writes its first rows: move the files of an earlier run with the same --out and --name (`names`:
    NAME.json, NAME.csv, ...) aside to NAME.prev-<their UTC modification time>.EXT, so that a rerun, finished or
    not, overwrites nothing a user kept. Prints and returns the (old, new) paths."""
    out = Path(out_dir)
    earlier = [out / n for n in names if (out / n).is_file()]
    if not earlier:
        return []
    stamp = datetime.datetime.fromtimestamp(max(p.stat().st_mtime for p in earlier), datetime.timezone.utc)
    tag = stamp.strftime("%Y%m%dT%H%M%SZ")
    moved = []
    for path in earlier:
        stem, ext = (path.name[:-len(path.suffix)], path.suffix) if path.suffix else (path.name, "")
        target, k = path.with_name(f"{stem}.prev-{tag}{ext}"), 1
        while target.exists():
            k += 1
            target = path.with_name(f"{stem}.prev-{tag}-{k}{ext}")
        os.replace(path, target)
        moved.append((path, target))
    print(f"kept the earlier run's results: {', '.join(f'{a.name} -> {b.name}' for a, b in moved)} (in {out})",
          flush=True)
    return moved


COUNT_FIELDS = ("flops", "min_bytes")  # counts: written in full (6 significant digits would round them)


def _fmt_csv(v, key: str = ""):
    if key in COUNT_FIELDS and isinstance(v, float) and v.is_integer():
        return str(int(v))
    return f"{v:.6g}" if isinstance(v, float) else v


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


TABLE_COLUMNS = (
    ("provider", "provider"), ("mode", "mode"), ("dtype", "dtype"), ("shape", "shape"), ("batch", "N"),
    ("median_ms", "ms"), ("p20_ms", "p20"), ("p80_ms", "p80"), ("useful_tflops", "TF/s use"),
    ("dense_tflops", "TF/s dense"), ("pct_peak", "%peak"), ("speedup_vs_eager", "x eager"), ("anchor", "anchor"),
    ("speedup_vs_anchor", "x anchor"), ("speedup_vs_compile", "x compile"), ("bound_us", "bound µs"),
    ("pct_of_bound", "%bound"), ("images_per_s", "img/s"), ("peak_mem_mb", "MiB"), ("status", "status"),
)


def print_table(rows: list[dict], title: str = "", file=None) -> None:
    """A fixed-width table of the rows; notes of skipped or failed rows are listed below it."""
    file = file or sys.stdout
    used = [(k, h) for k, h in TABLE_COLUMNS if any(r.get(k) is not None for r in rows)]
    cells = [[_fmt(r.get(k)) for k, _ in used] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(used)]
    if title:
        print(title, file=file)
    print("  ".join(h.ljust(wd) for (_, h), wd in zip(used, widths, strict=True)), file=file)
    for c in cells:
        print("  ".join(v.ljust(wd) for v, wd in zip(c, widths, strict=True)), file=file)
    notes = sorted({(r["provider"], r["status"], r["note"]) for r in rows if r["status"] != "ok" and r.get("note")})
    for provider, status, note in notes:
        print(f"  {status}: {provider}: {note}", file=file)
    file.flush()


def plot(rows: list[dict], out_dir: str | Path, name: str) -> Path | None:
    """{name}.png: per (mode, dtype), speedup over the anchor (the fastest eager setup) by shape and provider; None
    (and why) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot: matplotlib is not installed, so {name}.png was not written (pip install matplotlib)",
              file=sys.stderr)
        return None
    ok = [r for r in rows if r["status"] == "ok" and r.get("speedup_vs_anchor") is not None]
    panels = sorted({(r["mode"], r["dtype"]) for r in ok})
    if not panels:
        print(f"--plot: no timed rows with an eager anchor, so {name}.png was not written", file=sys.stderr)
        return None
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 3.8 * nrows), squeeze=False)
    for ax, (mode, dtype) in zip(axes.flat, panels, strict=False):
        sel = [r for r in ok if (r["mode"], r["dtype"]) == (mode, dtype)]
        cases = list(dict.fromkeys(f"{r['shape']} N{r['batch']}" for r in sel))
        providers = list(dict.fromkeys(r["provider"] for r in sel))
        width = 0.8 / len(providers)
        for i, p in enumerate(providers):
            vals = {f"{r['shape']} N{r['batch']}": r["speedup_vs_anchor"] for r in sel if r["provider"] == p}
            xs = [j + i * width for j, c in enumerate(cases) if c in vals]
            ax.bar(xs, [vals[c] for c in cases if c in vals], width, label=p)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels(cases, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("speedup over the anchor (fastest eager)")
        ax.set_title(f"{name}: {mode}, {dtype}", fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    gpu = rows[0]["gpu"] if rows else ""
    fig.suptitle(f"{gpu} — torch {rows[0]['torch'] if rows else ''}", fontsize=9)
    fig.tight_layout()
    path = Path(out_dir) / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- command line --------------------------------------------------------------------------------------------


def csv_list(kind: Callable = str, choices: Iterable | None = None) -> Callable[[str], list]:
    """argparse type: a comma-separated list, each item converted and checked against choices."""
    allowed = None if choices is None else list(choices)

    def parse(text: str) -> list:
        parts = [t.strip() for t in text.split(",")]
        if not any(parts):
            raise argparse.ArgumentTypeError("expected a comma-separated list with at least one item")
        if not all(parts):  # "eager,,cpu" ran as eager,cpu: a name left out of a list is more likely than meant
            raise argparse.ArgumentTypeError(f"an empty item in {text!r}: expected names or numbers between the commas")
        try:
            items = [kind(t) for t in parts]
        except ValueError:
            expected = f"of {sorted(allowed)}" if allowed is not None else f"of {getattr(kind, '__name__', 'value')}s"
            raise argparse.ArgumentTypeError(f"expected a comma-separated list {expected}, got {text!r}") from None
        if allowed is not None:
            bad = [t for t in items if t not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"{bad} not in {allowed}")
        twice = sorted({t for t in items if items.count(t) > 1}, key=items.index)
        if twice:  # each would run (and be written) twice, as two rows of one case
            raise argparse.ArgumentTypeError(f"{', '.join(map(str, twice))} listed more than once in {text!r}")
        return items

    return parse


INT_MAX = 2**31 - 1  # the largest count or size a flag takes: beyond 2**63 torch's sizes overflowed (a traceback)


def int_at_least(low: int, what: str, high: int = INT_MAX, why_high: str = "") -> Callable[[str], int]:
    """argparse type: an integer in [low, high] (what it counts is named in the error, and `why_high` in the error
    of a value above `high`)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low} ({what}), got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low} ({what}), got {value}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high} ({what}{why_high}), got {value}")
        return value

    return parse


# argparse type of --threads: at most this machine's logical CPUs (torch.set_num_threads(100000) crashed libgomp)
cpu_threads = int_at_least(1, "torch CPU threads", os.cpu_count() or 1, ": this machine's logical CPUs")


def device_name(text: str) -> str:
    """argparse type of --device: cuda (only where a CUDA device is visible) or cpu."""
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda: no CUDA device is visible here; use --device cpu")
    return text


def budget_seconds(text: str) -> float:
    """argparse type: a finite number of seconds >= 0 (0: every case is recorded as skipped, nothing runs)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text}")
    return value


def out_folder(text: str) -> str:
    """argparse type: the results folder: a folder, or a path that does not exist yet (created when the first rows
    are written). Checked here, before any case runs, so that a folder that cannot be made or written is a usage
    error instead of a traceback after the first case: the folder, or else its nearest existing parent, must be a
    folder in which a file can be made (an unnamed temporary file, gone at once)."""
    if not text:  # Path("") is ".": the results would land wherever the script was started
        raise argparse.ArgumentTypeError("expected the results folder, got an empty value (created if missing; "
                                         "give . for the current folder)")
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder (the results folder, created if "
                                         "missing)")
    from training.checkpoint import NOT_A_FOLDER, unwritable_folder

    problem = unwritable_folder(text)
    if problem is not None:
        where, why = problem
        if why == NOT_A_FOLDER:
            raise argparse.ArgumentTypeError(f"cannot create the results folder {text}: {where} {why}")
        if where == os.path.abspath(text):
            raise argparse.ArgumentTypeError(f"cannot write in the results folder {text}: {why}")
        raise argparse.ArgumentTypeError(f"cannot create the results folder {text} (in {where}): {why}")
    return text


# What a results file's name may grow by in its folder: atomic_write's temporary copy, ".NAME.<pid>.<random>.tmp"
# (22 bytes more at most), and set_aside_earlier_results' NAME.prev-<UTC time>[-k].EXT (22 + 3).
TEMP_NAME_MARGIN = 30


def name_max(folder: str | Path) -> int:
    """The longest file name, in bytes, the file system of `folder` (or of its nearest existing parent, where it is
    not made yet) admits: PC_NAME_MAX, or 255 where that cannot be asked."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        limit = os.pathconf(probe, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or no answer for this file system
        return 255
    return limit if limit > 0 else 255


def check_output_files(parser: argparse.ArgumentParser, out_dir: str | Path, stem: str, names: Iterable[str]
                       ) -> None:
    """A usage error (exit status 2, before any case runs) when one of the result files `names` (each `stem`, the
    --name, and a suffix) in the --out folder cannot be written: with the TEMP_NAME_MARGIN its writes add, the
    longest is too long a file name for that folder (--name); a folder, or something else that is not a plain file,
    already has its name (--out)."""
    names = list(names)
    limit, size = name_max(out_dir), len(os.fsencode(stem))
    longest = max(names, key=lambda n: len(os.fsencode(n)))
    grows = len(os.fsencode(longest)) - size + TEMP_NAME_MARGIN  # the suffix, and what a write adds for a moment
    if size + grows > limit:
        parser.error(f"argument --name: too long, {size} bytes: at most {max(limit - grows, 0)} here (the longest "
                     f"results file, NAME{longest[len(stem):]}, and the ~{TEMP_NAME_MARGIN} bytes that writing it "
                     f"adds must fit the {limit}-byte file names of {out_dir})")
    for name in names:
        path = Path(out_dir) / name
        if path.exists() and not path.is_file():
            kind = "a folder" if path.is_dir() else "not a plain file"
            parser.error(f"argument --out: {path} is {kind}: the results file {name} cannot be written there "
                         "(choose another --out or --name)")


RESULT_SUFFIXES = (".json", ".csv", ".png", "_profile.txt")  # NAME + each: the files add_common_args' scripts write


def output_names(args: argparse.Namespace) -> list[str]:
    """The files a script of add_common_args writes in --out: NAME.json, NAME.csv, NAME.png with --plot,
    NAME_profile.txt with --profile."""
    return ([f"{args.name}.json", f"{args.name}.csv"] + [f"{args.name}.png"] * bool(getattr(args, "plot", False))
            + [f"{args.name}_profile.txt"] * bool(getattr(args, "profile", False)))


def check_dtypes(parser: argparse.ArgumentParser, device: str, flag: str, dtypes: Iterable[str] | None) -> None:
    """A usage error for tf32 with --device cpu: TF32 is a CUDA matmul mode (tensor cores); the CPU would compute
    fp32 and record it as tf32."""
    if device == "cpu" and "tf32" in (dtypes or ()):
        parser.error(f"argument {flag}: tf32 needs --device cuda: TF32 is a CUDA matmul mode (tensor-core math on "
                     "float32 storage); on the CPU the rows would be fp32's under another name (use fp32)")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parser.parse_args(argv), then the checks that need several flags, before any case runs: no tf32 on the CPU
    (check_dtypes), that the result files can be written (check_output_files), and matplotlib for --plot."""
    args = parser.parse_args(argv)
    check_dtypes(parser, args.device, "--dtypes", args.dtypes)
    check_output_files(parser, args.out, args.name, output_names(args))
    if getattr(args, "plot", False) and importlib.util.find_spec("matplotlib") is None:
        parser.error("argument --plot: needs matplotlib, which is not installed here (pip install matplotlib, or "
                     "leave --plot out)")
    return args


def file_stem(text: str) -> str:
    """argparse type: the results' file stem (NAME.json, NAME.csv, ...): a plain file name, no folder in it (the
    folder is --out), not empty, not hidden. Its length, which the folder's file system limits, is checked with the
    folder's (check_output_files)."""
    if (not text or text in (".", "..") or text.startswith(".") or "/" in text or os.sep in text or "\0" in text
            or text != text.strip()):  # (' ' wrote " .json")
        raise argparse.ArgumentTypeError(f"{text!r} is not a file stem: expected a plain file name such as "
                                         "'aspp-h200' (no folder: give that with --out; not empty, not starting "
                                         "with a dot or a space, not ending with one)")
    return text


def add_common_args(parser: argparse.ArgumentParser, name: str, modes: Sequence[str] = MODES,
                    modes_help: str = "comma list of train_fwd (train-mode forward, autograd recording), eval_fwd "
                                      "(no_grad), fwd_bwd (forward + backward)",
                    dtypes_default: str = "all on cuda, fp32 on cpu",
                    batches_default: str = "16 on cuda, 2 on cpu") -> None:
    """Flags aspp_bench, conv_bn_relu_bench and train_bench take (the subject-specific ones are added by the
    script; overhead_bench has its own). Every option's help names its default (tests/benchmarks)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"),
                        type=device_name, help="cuda: DeepLab shapes; cpu: small shapes, the CPU providers (cpu, "
                        "cpu-cl, reference, eager, eager-cl; train_bench also cpu-lean) (default: cuda when visible)")
    parser.add_argument("--dtypes", type=csv_list(str, DTYPES), default=None,
                        help="comma list of bf16, fp16, fp32 (TF32 off), tf32 (fp32 with TF32 on); "
                             f"default: {dtypes_default}")
    parser.add_argument("--modes", type=csv_list(str, modes), default=list(modes),
                        help=f"{modes_help} (default: {','.join(modes)})")
    parser.add_argument("--batches", type=csv_list(int_at_least(1, "a batch size")), default=None,
                        help=f"comma list of batch sizes (default: {batches_default})")
    parser.add_argument("--quick", action="store_true", help="fewest shapes and repetitions (tests, smoke runs)")
    parser.add_argument("--out", type=out_folder, default="bench_out",
                        help="folder for the JSON/CSV/PNG results, created if missing (default: %(default)s)")
    parser.add_argument("--name", type=file_stem, default=name,
                        help="file stem of the results, in --out (default: %(default)s)")
    parser.add_argument("--plot", action="store_true", help="also write NAME.png (needs matplotlib)")
    parser.add_argument("--profile", action="store_true",
                        help="append each timed case's top kernels (torch.profiler) and where its host time goes "
                             "(cProfile) to NAME_profile.txt")
    parser.add_argument("--threads", type=cpu_threads, default=None,
                        help="torch CPU threads (default: torch's); 1 avoids oversubscription on a shared machine")
    parser.add_argument("--budget-s", type=budget_seconds, default=None,
                        help="wall-clock budget: cases left when it is spent are recorded as skipped (default: none)")


def resolve_device(args: argparse.Namespace) -> torch.device:
    """The device asked for (--device's type, device_name, refused cuda where none is visible); applies --threads."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def run_script(main: Callable[[], int], script: str) -> int:
    """main() of a benchmark script run from the command line; Ctrl-C (or the SIGINT of gpu_suite.sh's timeout)
    is one line saying what was kept, and exit status 130, instead of a traceback; SIGTERM the same line and exit
    status 143 (it ended the process silently: the results files were kept, marked partial, unsaid); a reader of
    stdout that stopped early (`... | head -1`) ends the run quietly with exit status 1 (the results files keep
    the cases finished)."""
    from training.signals import Terminated, raise_terminated, signals_ignored

    # SIGTERM as Ctrl-C, then as it was. An ignored SIGTERM (inherited) stays ignored; off the main thread (a test
    # calling main) no handler is set: SIG_IGN there means nothing to restore.
    try:
        previous = signal.getsignal(signal.SIGTERM)
        if previous is not signal.SIG_IGN:
            signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:
        previous = signal.SIG_IGN
    try:
        return main()
    except BrokenPipeError:
        _silence_stdout()
        return 1
    except ResultsBusy as e:
        print(f"{script}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if not (e.strerror and e.filename):
            raise
        # a file that could not be written (a full disk, a folder made read-only): one line; a results file is
        # replaced in one step, so what it held before (an earlier save of this run) is whole
        results = any(Path(e.filename).parent == lock.parent and not Path(e.filename).name.startswith(".")
                      for lock in _CLAIMS)
        print(f"{script}: {e.strerror} ({e.filename})"
              + ("; the results files keep what they held before this write" if results else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        # a second SIGINT (gpu_suite.sh hands one to the phase's process group, and its timeout another) must not
        # interrupt this report with a traceback: ignored while it is written
        with signals_ignored():
            _report_interrupt(script, "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted")
        return 143 if isinstance(e, Terminated) else 130
    finally:
        release_results()
        if previous is not signal.SIG_IGN:  # (None: a handler not set from Python, the default)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _report_interrupt(script: str, what: str = "interrupted") -> None:
    written = [p for lock in _CLAIMS for ext in (".json", ".csv")
               if (p := lock.with_name(lock.name[1:-len(".lock")] + ext)).is_file()]
    if not written:  # stopped before its first save (or before it claimed its --out): nothing to keep
        print(f"\n{script}: {what}: before any case finished; no results file was written", file=sys.stderr)
        return
    print(f"\n{script}: {what}: the results files keep the cases finished so far, marked partial (the "
          "JSON's meta, the CSV's last row; overhead_bench: the CSV's last row and the Markdown's first "
          "paragraph)", file=sys.stderr)


def finish(rows: list[dict], args: argparse.Namespace, meta: dict, title: str) -> int:
    """Speedups, table, files, plot. Returns the exit status: 0 when a row ran and none failed, else 1."""
    fill_speedups(rows)
    print_table(rows, title)
    json_path, csv_path = write_results(rows, args.out, args.name, meta)
    print(f"wrote {json_path} and {csv_path}")
    if args.plot:
        path = plot(rows, args.out, args.name)
        if path:
            print(f"wrote {path}")
    release_results()
    # 1 when a row failed (a skipped one, e.g. a provider that cannot run here, is no failure) or none ran
    return 0 if any(r["status"] == "ok" for r in rows) and not any(r["status"] == "error" for r in rows) else 1


# ---- the goals ---------------------------------------------------------------------------------------

# (title, file stem, mode, baseline, target): fused median vs the baseline's, H100 bf16 (issue #7). Baseline "eager":
# the fastest eager setup of the case (EAGER_PROVIDERS: the anchor); "compile": the faster of torch.compile default
# and max-autotune. Each line also gives the ratio against eager NCHW (the first runs' only baseline).
GOALS = (
    ("ASPP train forward vs best eager", "aspp_goal", "train_fwd", "eager", 1.8),
    ("ASPP eval forward vs best eager", "aspp_goal", "eval_fwd", "eager", 1.8),
    ("ASPP train forward vs torch.compile", "aspp_goal", "train_fwd", "compile", 1.4),
    ("ASPP eval forward vs torch.compile", "aspp_goal", "eval_fwd", "compile", 1.4),
    ("ASPP forward + backward vs best eager", "aspp_goal", "fwd_bwd", "eager", 1.6),
    ("training step vs best eager (images/s)", "train_bench", "train_step", "eager", 1.3),
)
BASELINES = {"eager": EAGER_PROVIDERS, "compile": COMPILE_PROVIDERS}
# Issue #9: the memory-lean training step (train_bench's "-lean" providers) peaks at most at this fraction of
# eager's memory, at equal or better speed (R50, output stride 16, crop 513, batch 16).
LEAN_MEMORY_GOAL = 0.6


# The fused providers a goal compares, by backend: each backend's forms a user runs (cuda, cuda-cl: the fused module
# channels_last, as train.py --fused-ops runs; cuda-lean: train_bench's memory-lean model), its fastest row against
# the baseline, as the anchor is the fastest eager setup. The -graph replays are left out: they time the kernels
# without the host work around them, and no baseline is replayed so (the anchor's setups are plain calls).
GOAL_BACKENDS = ("cuda", "triton", "cpu")


def goal_backend(provider: str) -> str | None:
    """The backend of GOAL_BACKENDS a provider runs as a user would (cpu-cl -> cpu, triton-lean -> triton); None
    for eager, compile, reference and the -graph replays."""
    if provider.endswith(GRAPH_SUFFIX):
        return None
    backend = provider.removesuffix("-lean").removesuffix("-cl")
    return backend if backend in GOAL_BACKENDS else None


def _fastest(sel: dict[str, dict], providers: Sequence[str]) -> dict | None:
    return min((sel[p] for p in providers if p in sel), key=lambda r: r["median_ms"], default=None)


def goal_report(out_dir: str | Path) -> list[str]:
    """Lines saying, for each goal and fused provider, the measured ratio against its target (or why none).
    FileNotFoundError / NotADirectoryError when out_dir is not a folder; a results file that cannot be read gets
    a line saying why."""
    return _goal_report(out_dir)[0]


# The results files the goals read, by their name in a run (gpu_suite.sh's NAME.json; a copy of its NAME.csv does as
# well): aspp_goal and train_bench, and train_bench_lean where a run measured the lean providers apart. A folder may
# hold them under a prefix naming the run, as benchmarks/results/ does: DATE-CARD-NAME.EXT
# (2026-11-28-h200-aspp_goal.csv).
GOAL_STEMS = ("aspp_goal", "train_bench")
LEAN_STEMS = ("train_bench", "train_bench_lean")
_GOAL_FILE = re.compile(r"^(?P<prefix>.*-)?(?P<stem>aspp_goal|train_bench|train_bench_lean)\.(?P<ext>json|csv)$")


def goal_files(out_dir: str | Path) -> dict[str, dict[str, Path]]:
    """The goals' results files in out_dir, by run: {prefix: {stem: path}}, prefix "" for the unprefixed NAME.EXT
    (gpu_suite.sh's folder) and e.g. "2026-11-28-h200-" for benchmarks/results/'s DATE-CARD-NAME.EXT; of a
    run's NAME.json and NAME.csv, the JSON. {} when there is none."""
    runs: dict[str, dict[str, Path]] = {}
    for path in sorted(Path(out_dir).iterdir()):
        m = _GOAL_FILE.match(path.name)
        if m is None or not path.is_file():
            continue
        stems = runs.setdefault(m["prefix"] or "", {})
        if m["stem"] not in stems or m["ext"] == "json":
            stems[m["stem"]] = path
    return dict(sorted(runs.items()))


def _goal_rows(path: Path) -> tuple[list[dict], bool]:
    """read_results' rows, with a CSV's median_ms and peak_mem_mb as numbers (None where empty), and whether the
    file is a partial run's (one that had not finished when it was written)."""
    rows, meta = read_results(path)
    for r in rows:
        for key in ("median_ms", "peak_mem_mb"):
            v = r.get(key)
            if isinstance(v, str):
                try:
                    r[key] = v = float(v) if v.strip() else None
                except ValueError:
                    raise ValueError(f"{path}: a row's {key} is not a number ({v!r}): {r}") from None
            # a time of 0, below 0 or NaN divided by zero (a traceback) or gave a verdict ("nanx ... NOT met")
            if v is not None and not _measured(v, positive=key == "median_ms"):
                raise ValueError(f"{path}: a row's {key} is {v!r}, not a finite number "
                                 f"{'> 0' if key == 'median_ms' else '>= 0'}: {r}")
    return [r for r in rows if r["status"] != "ok" or r.get("median_ms") is not None], bool(meta.get("partial"))


def _measured(v, positive: bool) -> bool:
    """Whether `v` is a number a measurement can be: finite, > 0 (`positive`: a time) or >= 0 (a memory peak)."""
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and (v > 0 if positive else v >= 0))


def _goal_report(out_dir: str | Path) -> tuple[list[str], list[str]]:
    out = Path(out_dir)
    if not out.exists():
        raise FileNotFoundError(errno.ENOENT, "no such results folder", str(out))
    if not out.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(out))
    runs = goal_files(out)
    if not any(stem in stems for stems in runs.values() for stem in GOAL_STEMS):
        names = " nor ".join(f"{stem}.json" for stem in GOAL_STEMS)
        problem = (f"{out}: no {names} here (nor their .csv, nor a run's DATE-CARD-NAME copies such as "
                   "2026-11-28-h200-aspp_goal.csv; the results folder of gpu_suite.sh, or --out of aspp_bench --name "
                   "aspp_goal and train_bench)")
        return [], [problem]  # one line on stderr, nothing on stdout (as for a folder that is not there)
    lines, problems = [], []
    for prefix, stems in runs.items():
        if not any(stem in stems for stem in GOAL_STEMS):
            continue  # e.g. a lone train_bench_lean: reported with its run's train_bench only
        run_lines, run_problems = _run_goal_report(out, prefix, stems)
        lines += run_lines
        problems += run_problems
    return lines, problems


def _run_goal_report(out: Path, prefix: str, stems: dict[str, Path]) -> tuple[list[str], list[str]]:
    """The goals of one run: the files of `stems` (stem: path), those of GOAL_STEMS missing said so."""
    files: dict[str, list[dict] | str] = {}  # stem: its rows, or why they cannot be read
    names: dict[str, str] = {}  # stem: the file's name (the expected NAME.json when there is none)
    problems = []
    read = []  # the files read, a partial run's said so
    for stem in dict.fromkeys(GOAL_STEMS + LEAN_STEMS):
        path = stems.get(stem)
        names[stem] = path.name if path else f"{prefix}{stem}.json"
        if path is None:
            files[stem] = f"no {names[stem]}"
            continue
        try:
            files[stem], partial = _goal_rows(path)
        except (OSError, ValueError) as e:
            reason = str(e) if isinstance(e, ValueError) else f"{path}: {e.strerror or e}"
            files[stem] = f"cannot read {path.name}: {reason.removeprefix(f'{path}: ')}"
            problems.append(reason)
            partial = False
        if partial:  # its missing rows may be cases the run never reached
            names[stem] += " (partial run)"
        read.append(f"{path}{' (partial run)' if partial else ''}")
    lines = [f"read: {', '.join(read)}"] if read else []
    for title, stem, mode, base, target in GOALS:
        rows = files[stem]
        if isinstance(rows, str):
            lines.append(f"{title}: {rows}")
            continue
        rows = [r for r in rows if r["mode"] == mode and r["status"] == "ok"]
        if not rows:
            lines.append(f"{title}: no {mode} row ran in {names[stem]}")
            continue
        for shape, dtype, batch in dict.fromkeys((r["shape"], r["dtype"], r["batch"]) for r in rows):
            sel = {r["provider"]: r for r in rows if (r["shape"], r["dtype"], r["batch"]) == (shape, dtype, batch)}
            where = f"{title} [{shape}, {dtype}, N{batch}, {next(iter(sel.values())).get('gpu')}]"
            anchor = _fastest(sel, BASELINES[base])
            if anchor is None:
                lines.append(f"{where}: no {' / '.join(BASELINES[base])} row")
                continue
            fused = {b: [p for p in sel if goal_backend(p) == b] for b in GOAL_BACKENDS}
            if not any(fused.values()):
                lines.append(f"{where}: no {' / '.join(GOAL_BACKENDS)} row (nor their -cl / -lean forms) to compare "
                             f"with {anchor['provider']} (ran: {', '.join(sel)})")
            for backend, providers in fused.items():
                if not providers:
                    continue
                best = _fastest(sel, providers)  # as the anchor is the fastest eager setup: the fastest form
                p = best["provider"]
                ratio = anchor["median_ms"] / best["median_ms"]
                verdict = "met" if ratio >= target else "NOT met"
                which = f" (the fastest {backend} row of {', '.join(providers)})" if len(providers) > 1 else ""
                nchw = ""
                if base == "eager" and anchor["provider"] != "eager" and "eager" in sel:
                    nchw = f"; vs eager NCHW {sel['eager']['median_ms'] / best['median_ms']:.2f}x"
                lines.append(f"{where}: {p} {ratio:.2f}x vs {anchor['provider']} (goal {target}x) {verdict}{which}"
                             f"{nchw}")
    lean = [_lean_memory_report(files[stem], names[stem]) for stem in LEAN_STEMS if not isinstance(files[stem], str)]
    measured = [report for report in lean if not (len(report) == 1 and _NO_LEAN_ROWS in report[0])]
    if measured:
        lines += [line for report in measured for line in report]
    elif lean:
        lines += lean[0]
    else:
        lines += _lean_memory_report(files["train_bench"], names["train_bench"])
    return lines, problems


def _lean_memory_report(rows: list[dict] | str, name: str) -> list[str]:
    """The lean goal per case: peak memory and speed against the anchor (the fastest eager setup), and eager NCHW.
    `rows`: train_bench.json's rows, or why there are none."""
    title = f"lean training step peak memory <= {LEAN_MEMORY_GOAL}x eager's at >= eager's speed"
    if isinstance(rows, str):
        return [f"{title}: {rows}"]
    rows = [r for r in rows if r["mode"] == "train_step" and r["status"] == "ok"]
    lines = []
    for shape, batch, dtype in dict.fromkeys((r["shape"], r["batch"], r["dtype"]) for r in rows):
        sel = {r["provider"]: r for r in rows if (r["shape"], r["batch"], r["dtype"]) == (shape, batch, dtype)}
        anchor = _fastest({p: r for p, r in sel.items() if r.get("peak_mem_mb")}, EAGER_PROVIDERS)
        for p, r in sel.items():
            if not p.endswith("-lean") or anchor is None or not r.get("peak_mem_mb"):
                continue
            mem = r["peak_mem_mb"] / anchor["peak_mem_mb"]
            speed = anchor["median_ms"] / r["median_ms"]
            verdict = "met" if mem <= LEAN_MEMORY_GOAL and speed >= 1.0 else "NOT met"
            nchw = ""
            eager = sel.get("eager")
            if anchor["provider"] != "eager" and eager and eager.get("peak_mem_mb"):
                nchw = (f"; vs eager NCHW memory {r['peak_mem_mb'] / eager['peak_mem_mb']:.2f}x, speed "
                        f"{eager['median_ms'] / r['median_ms']:.2f}x")
            lines.append(f"{title} [{shape}, {dtype}, N{batch}, {r['gpu']}]: {p} memory {mem:.2f}x, speed "
                         f"{speed:.2f}x vs {anchor['provider']} {verdict}{nchw}")
    return lines or [f"{title}: {_NO_LEAN_ROWS} in {name}"]


_NO_LEAN_ROWS = "no lean and eager train_step rows with peak memory"


def _silence_stdout() -> None:
    """After a broken pipe: stdout to /dev/null, so that the interpreter's final flush raises nothing more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (a test's captured stdout): nothing to redirect
        pass


def main(argv: Sequence[str]) -> int:
    """python benchmarks/common.py goals DIR | roofline FILE | commit: the report on stdout; an unreadable or wrong
    input is one line on stderr and exit status 1 (a wrong command line: 2)."""
    usage = "usage: python benchmarks/common.py goals DIR | roofline FILE.csv | commit"
    argv = list(argv)
    if argv in (["-h"], ["--help"]):
        print(f"{usage}\n\n"
              "  goals DIR       the issues' goals, read from DIR's aspp_goal.json and train_bench.json\n"
              "  roofline FILE   each aspp / conv_bn_relu row's roofline (also for older results)\n"
              "  commit          the git_commit the rows will name ($GIT_COMMIT where set; gpu_suite.sh prints it)")
        return 0
    try:
        if argv == ["commit"]:
            print(git_commit())
        elif len(argv) == 2 and argv[0] == "goals":
            lines, problems = _goal_report(argv[1])
            if lines:
                print("\n".join(lines), flush=True)
            for problem in problems:
                print(f"benchmarks/common.py goals: {problem}", file=sys.stderr)
            return 1 if problems else 0
        elif len(argv) == 2 and argv[0] == "roofline":
            print("\n".join(roofline_report(argv[1])))
        else:
            print(usage, file=sys.stderr)
            return 2
    except BrokenPipeError:  # the reader stopped early (`goals DIR | head`): no message naming the results file
        _silence_stdout()
        return 1
    except OSError as e:  # a results file or folder that is not there: one line, not a traceback
        print(f"benchmarks/common.py {argv[0]}: {e.strerror or e}: {e.filename or argv[1]}", file=sys.stderr)
        return 1
    except ValueError as e:  # a file that is not a results file
        print(f"benchmarks/common.py {argv[0]}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # python benchmarks/common.py goals DIR: the goals, read from DIR's aspp_goal.json and train_bench.json
    # python benchmarks/common.py commit: the git_commit the rows will name (gpu_suite.sh prints it)
    # python benchmarks/common.py roofline FILE: each aspp / conv_bn_relu row's roofline (also for older results)
    sys.exit(main(sys.argv[1:]))

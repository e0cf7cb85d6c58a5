"""What every benchmark script shares: FLOP counting, timing, peak memory, result rows, writers, table, plots.

Timing: on CUDA `triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])` (median, p20, p80 in ms, L2 flushed
between calls by do_bench); on CPU a wall-clock loop with the same quantiles (do_bench needs a GPU).
Peak memory: `torch.cuda.max_memory_allocated` over one call after a reset (so it includes the inputs and
weights that are alive during the call); on CPU it is not measured (None, empty in CSV).
FLOPs: "useful" counts the (kernel tap, output position) pairs whose input position lies inside the image;
"dense" counts every tap, padding included: what an implicit-GEMM or cuDNN convolution computes.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `model/` and an uninstalled deeplab_ops live at the repository root
    sys.path.insert(0, str(REPO_ROOT))

QUANTILES = (0.5, 0.2, 0.8)

# One schema for every script's rows: JSON rows and CSV columns, in this order.
FIELDS = (
    "op", "provider", "mode", "dtype", "shape", "batch", "status", "median_ms", "p20_ms", "p80_ms",
    "useful_tflops", "dense_tflops", "pct_peak", "speedup_vs_eager", "images_per_s", "peak_mem_mb", "setup_s",
    "note", "device", "gpu", "torch", "triton", "git_commit", "time",
)
ENV_FIELDS = ("device", "gpu", "torch", "triton", "git_commit", "time")

# dtype names: fp32 runs with TF32 off, tf32 is float32 storage with TF32 tensor-core math on.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
MODES = ("train_fwd", "eval_fwd", "fwd_bwd")


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


def set_precision(dtype_name: str) -> torch.dtype:
    """Set TF32 for this dtype name (on only for 'tf32') and cuDNN autotuning; return the torch dtype."""
    if dtype_name not in DTYPES:
        raise ValueError(f"dtype {dtype_name!r} is not one of {tuple(DTYPES)}")
    tf32 = dtype_name == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    return DTYPES[dtype_name]


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
    reps = 3 if quick else 10
    if not warm:
        fn()
    times = []
    for _ in range(reps):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return tuple(quantile(times, q) for q in QUANTILES)


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


def mode_case(mode: str, module: torch.nn.Module, inputs: Sequence[torch.Tensor], compiled: bool = False):
    """(fn, tensors whose .grad the timer clears) running `module(*inputs)` in one of MODES.

    train_fwd: train mode with autograd recording (as in a training step); eval_fwd: eval mode under no_grad;
    fwd_bwd: train mode, forward then backward with a fixed random output gradient, grads for inputs[0] too (in
    DeepLab the input comes from the backbone). Compiled modules mark each call as a new CUDA-graph step.
    """
    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None) if compiled else None
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    module.train(mode != "eval_fwd")
    if mode == "eval_fwd":
        def fn():
            if mark:
                mark()
            with torch.no_grad():
                return module(*inputs)

        return fn, []
    if mode == "train_fwd":
        def fn():
            if mark:
                mark()
            return module(*inputs)

        return fn, []
    inputs[0].requires_grad_(True)
    grad = []

    def fn():
        if mark:
            mark()
        out = module(*inputs)
        if not grad:
            grad.append(torch.randn_like(out))
        out.backward(grad[0])

    return fn, list(module.parameters()) + [inputs[0]]


FUSED_PROVIDERS = ("triton", "cuda", "cpu", "reference")  # deeplab_ops backends, by name


def compiled(module: torch.nn.Module, provider: str) -> torch.nn.Module:
    """torch.compile for a compile provider (compile: default mode, compile-max: max-autotune), on a fresh dynamo
    state: each case compiles its own graph, so no recompile limit is reached and no case reuses another's guards."""
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(module, mode="max-autotune" if provider == "compile-max" else "default")


def unavailable(provider: str, op: str, device: torch.device, **call) -> str:
    """Why a provider cannot run this call of `op` here ('' when it can), in deeplab_ops' own words."""
    if provider in FUSED_PROVIDERS:
        from deeplab_ops import backends

        return "; ".join(backends.not_supported_reasons(provider, op, device, **call))
    if provider.startswith("compile") and device.type == "cuda":
        from deeplab_ops.backends import triton_import_error

        return triton_import_error() or ""
    return ""


class Runner:
    """Runs cases in order and keeps their rows: skips (with the reason printed) what cannot or need not run."""

    def __init__(self, env: dict, device: torch.device, args: argparse.Namespace, peak_tflops: float | None) -> None:
        self.env, self.device, self.args, self.peak = env, device, args, peak_tflops
        self.budget = Budget(args.budget_s)
        self.rows: list[dict] = []

    def skip(self, reason: str, **case) -> None:
        print(f"  skip {case.get('provider')} {case.get('mode')} {case.get('dtype')} {case.get('shape')} "
              f"N{case.get('batch')}: {reason}", flush=True)
        self.rows.append(make_row(self.env, status="skipped", note=reason, **case))
        self.save()

    def save(self) -> None:
        """Write the rows so far: a run killed by a timeout still leaves every finished case on disk."""
        fill_speedups(self.rows)
        write_results(self.rows, self.args.out, self.args.name, {"partial": True})

    def run(self, build, *, reason: str = "", flops=None, images=None, note: str = "", **case) -> dict | None:
        """Run one case unless `reason` (or a spent budget) says to skip it; returns its row."""
        if not reason and self.budget.spent():
            reason = f"time budget of {self.args.budget_s:.0f} s spent"
        if reason:
            self.skip(reason, **case)
            return None
        profile = None
        if getattr(self.args, "profile", False):
            profile = Path(self.args.out) / f"{self.args.name}_profile.txt"
        row = run_case(self.env, build, self.device, quick=self.args.quick, flops=flops, peak_tflops=self.peak,
                       images=images, profile=profile, **case)
        if note and not row["note"]:
            row["note"] = note
        self.rows.append(row)
        self.save()
        extra = f" {row['images_per_s']:.3g} img/s" if row.get("images_per_s") else ""
        print(f"  {case.get('provider'):<12} {case.get('mode'):<9} {case.get('dtype'):<4} N{case.get('batch'):<3} "
              f"{case.get('shape')}: {_fmt(row['median_ms'])} ms{extra} {row['status']}", flush=True)
        return row


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
              grad_to_none: Sequence[torch.Tensor] | None = None, setup_s: float | None = None, **fields) -> dict:
    """Time fn and fill the figures of a row: times, TFLOP/s, % of peak, images/s, peak memory."""
    median, p20, p80 = bench(fn, device, quick, grad_to_none, warm=setup_s is not None)
    row = make_row(env, status="ok", median_ms=median, p20_ms=p20, p80_ms=p80, setup_s=setup_s, **fields)
    if flops is not None:
        row["useful_tflops"] = flops[0] / (median * 1e-3) / 1e12
        row["dense_tflops"] = flops[1] / (median * 1e-3) / 1e12
        if peak_tflops:
            row["pct_peak"] = 100.0 * row["useful_tflops"] / peak_tflops
    if images is not None:
        row["images_per_s"] = images / (median * 1e-3)
    row["peak_mem_mb"] = peak_memory_mb(fn, device)
    return row


def run_case(env: dict, build: Callable[[], tuple[Callable[[], object], list[torch.Tensor]]], device: torch.device,
             *, quick: bool, flops=None, peak_tflops=None, images=None, profile: Path | None = None,
             **fields) -> dict:
    """Build a case (returning fn and the tensors whose grads to clear), time its first call, then time it;
    with `profile`, append the case's top kernels (torch.profiler, 3 calls) to that file.

    Any exception becomes a row with status 'error' and the message in note: one broken provider never stops a run.
    """
    try:
        start = time.perf_counter()
        fn, grads = build()
        fn()
        synchronize(device)
        setup_s = time.perf_counter() - start
        row = timed_row(env, fn, device, quick=quick, flops=flops, peak_tflops=peak_tflops, images=images,
                        grad_to_none=grads, setup_s=setup_s, **fields)
        if profile is not None:
            title = " ".join(str(fields.get(k)) for k in ("provider", "mode", "dtype", "shape", "batch"))
            try:
                profile_case(fn, device, profile, title)
            except Exception as e:  # noqa: BLE001  (a profiler failure must not discard the timing)
                print(f"  profiling {title} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return row
    except Exception as e:  # noqa: BLE001  (reported in the row and on stderr)
        message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        print(f"  error in {fields.get('provider')} {fields.get('mode')} {fields.get('shape')}: {message}",
              file=sys.stderr)
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
        return make_row(env, status="error", note=message[:300], **fields)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def profile_case(fn: Callable[[], object], device: torch.device, path: Path, title: str, calls: int = 3) -> None:
    """Append the top operators and kernels of `calls` calls of fn, by device (else CPU) time, to path."""
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


def fill_speedups(rows: list[dict], key: Sequence[str] = ("op", "mode", "dtype", "shape", "batch")) -> None:
    """speedup_vs_eager = eager median / this median, for rows sharing `key` with an 'ok' eager row."""
    eager = {tuple(r[k] for k in key): r["median_ms"] for r in rows if r["provider"] == "eager" and r["status"] == "ok"}
    for r in rows:
        base = eager.get(tuple(r[k] for k in key))
        if r["status"] == "ok" and base:
            r["speedup_vs_eager"] = base / r["median_ms"]


class Budget:
    """A wall-clock budget: once spent, the remaining cases are recorded as skipped instead of run."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.start = time.monotonic()

    def spent(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.start > self.seconds


# ---- output --------------------------------------------------------------------------------------------------


def write_results(rows: list[dict], out_dir: str | Path, name: str, extra: dict | None = None) -> tuple[Path, Path]:
    """Write {name}.json ({"meta", "rows"}) and {name}.csv (FIELDS columns) under out_dir; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / f"{name}.json", out / f"{name}.csv"
    json_path.write_text(json.dumps({"meta": extra or {}, "rows": rows}, indent=1, default=str) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else _fmt_csv(r.get(k))) for k in FIELDS})
    return json_path, csv_path


def _fmt_csv(v):
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
    ("dense_tflops", "TF/s dense"), ("pct_peak", "%peak"), ("speedup_vs_eager", "x eager"),
    ("images_per_s", "img/s"), ("peak_mem_mb", "MiB"), ("status", "status"),
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
    """{name}.png: per (mode, dtype), speedup over eager by shape and provider; None (and why) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot: matplotlib is not installed, so {name}.png was not written (pip install matplotlib)",
              file=sys.stderr)
        return None
    ok = [r for r in rows if r["status"] == "ok" and r.get("speedup_vs_eager") is not None]
    panels = sorted({(r["mode"], r["dtype"]) for r in ok})
    if not panels:
        print(f"--plot: no timed rows with an eager baseline, so {name}.png was not written", file=sys.stderr)
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
            vals = {f"{r['shape']} N{r['batch']}": r["speedup_vs_eager"] for r in sel if r["provider"] == p}
            xs = [j + i * width for j, c in enumerate(cases) if c in vals]
            ax.bar(xs, [vals[c] for c in cases if c in vals], width, label=p)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels(cases, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("speedup over eager")
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
        items = [kind(t.strip()) for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list with at least one item")
        if allowed is not None:
            bad = [t for t in items if t not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"{bad} not in {allowed}")
        return items

    return parse


def add_common_args(parser: argparse.ArgumentParser, name: str, modes: Sequence[str] = MODES,
                    modes_help: str = "comma list of train_fwd (train-mode forward, autograd recording), eval_fwd "
                                      "(no_grad), fwd_bwd (forward + backward)",
                    dtypes_default: str = "all on cuda, fp32 on cpu") -> None:
    """Flags every script takes (the subject-specific ones are added by the script)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"),
                        help="cuda: DeepLab shapes; cpu: small shapes, providers cpu/reference/eager "
                             "(default: cuda when visible)")
    parser.add_argument("--dtypes", type=csv_list(str, DTYPES), default=None,
                        help="comma list of bf16, fp16, fp32 (TF32 off), tf32 (fp32 with TF32 on); "
                             f"default: {dtypes_default}")
    parser.add_argument("--modes", type=csv_list(str, modes), default=list(modes), help=modes_help)
    parser.add_argument("--batches", type=csv_list(int), default=None, help="comma list of batch sizes")
    parser.add_argument("--quick", action="store_true", help="fewest shapes and repetitions (tests, smoke runs)")
    parser.add_argument("--out", default="bench_out", help="directory for the JSON/CSV/PNG results")
    parser.add_argument("--name", default=name, help="file stem of the results (default: %(default)s)")
    parser.add_argument("--plot", action="store_true", help="also write NAME.png (needs matplotlib)")
    parser.add_argument("--profile", action="store_true",
                        help="append each timed case's top kernels (torch.profiler) to NAME_profile.txt")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 avoids oversubscription on a shared machine")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget: cases left when it is spent are recorded as skipped")


def resolve_device(args: argparse.Namespace) -> torch.device:
    """The device asked for (an error when CUDA is asked for and absent); applies --threads."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible here; use --device cpu")
    return torch.device(args.device)


def finish(rows: list[dict], args: argparse.Namespace, meta: dict, title: str) -> int:
    """Speedups, table, files, plot. Returns the exit status: 0 unless no row ran at all."""
    fill_speedups(rows)
    print_table(rows, title)
    json_path, csv_path = write_results(rows, args.out, args.name, meta)
    print(f"wrote {json_path} and {csv_path}")
    if args.plot:
        path = plot(rows, args.out, args.name)
        if path:
            print(f"wrote {path}")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


# ---- the goals ---------------------------------------------------------------------------------------

# (title, file stem, mode, baseline provider, target): fused median vs baseline median, H100 bf16 (issue #7).
GOALS = (
    ("ASPP train forward vs eager", "aspp_goal", "train_fwd", "eager", 1.8),
    ("ASPP eval forward vs eager", "aspp_goal", "eval_fwd", "eager", 1.8),
    ("ASPP train forward vs compile max-autotune", "aspp_goal", "train_fwd", "compile-max", 1.4),
    ("ASPP eval forward vs compile max-autotune", "aspp_goal", "eval_fwd", "compile-max", 1.4),
    ("ASPP forward + backward vs eager", "aspp_goal", "fwd_bwd", "eager", 1.6),
    ("training step vs eager (images/s)", "train_bench", "train_step", "eager", 1.3),
)
# Issue #9: the memory-lean training step (train_bench's "-lean" providers) peaks at most at this fraction of
# eager's memory, at equal or better speed (R50, output stride 16, crop 513, batch 16).
LEAN_MEMORY_GOAL = 0.6


def goal_report(out_dir: str | Path) -> list[str]:
    """Lines saying, for each goal and fused provider, the measured ratio against its target (or why none)."""
    lines = []
    for title, stem, mode, base, target in GOALS:
        path = Path(out_dir) / f"{stem}.json"
        if not path.exists():
            lines.append(f"{title}: no {path.name}")
            continue
        rows = [r for r in json.loads(path.read_text())["rows"] if r["mode"] == mode and r["status"] == "ok"]
        if not rows:
            lines.append(f"{title}: no {mode} row ran in {path.name}")
            continue
        for shape in dict.fromkeys(r["shape"] for r in rows):
            sel = {r["provider"]: r for r in rows if r["shape"] == shape}
            if base not in sel:
                lines.append(f"{title} [{shape}]: no {base} row")
                continue
            for p in ("cuda", "triton", "cpu"):
                if p in sel:
                    ratio = sel[base]["median_ms"] / sel[p]["median_ms"]
                    verdict = "met" if ratio >= target else "NOT met"
                    lines.append(f"{title} [{shape}, {sel[p]['dtype']}, N{sel[p]['batch']}, {sel[p]['gpu']}]: "
                                 f"{p} {ratio:.2f}x (goal {target}x) {verdict}")
    lines += _lean_memory_report(Path(out_dir) / "train_bench.json")
    return lines


def _lean_memory_report(path: Path) -> list[str]:
    title = f"lean training step peak memory <= {LEAN_MEMORY_GOAL}x eager's at >= eager's speed"
    if not path.exists():
        return [f"{title}: no {path.name}"]
    rows = [r for r in json.loads(path.read_text())["rows"] if r["mode"] == "train_step" and r["status"] == "ok"]
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        sel = {(r["provider"], r["batch"], r["dtype"]): r for r in rows if r["shape"] == shape}
        for (p, batch, dtype), r in sel.items():
            eager = sel.get(("eager", batch, dtype))
            if not p.endswith("-lean") or eager is None or not r.get("peak_mem_mb") or not eager.get("peak_mem_mb"):
                continue
            mem = r["peak_mem_mb"] / eager["peak_mem_mb"]
            speed = eager["median_ms"] / r["median_ms"]
            verdict = "met" if mem <= LEAN_MEMORY_GOAL and speed >= 1.0 else "NOT met"
            lines.append(f"{title} [{shape}, {dtype}, N{batch}, {r['gpu']}]: {p} memory {mem:.2f}x, speed "
                         f"{speed:.2f}x {verdict}")
    return lines or [f"{title}: no lean and eager train_step rows with peak memory in {path.name}"]


if __name__ == "__main__":
    # python benchmarks/common.py goals DIR: the goals, read from DIR's aspp_goal.json and train_bench.json
    # python benchmarks/common.py commit: the git_commit the rows will name (gpu_suite.sh prints it)
    if len(sys.argv) == 2 and sys.argv[1] == "commit":
        print(git_commit())
    elif len(sys.argv) == 3 and sys.argv[1] == "goals":
        print("\n".join(goal_report(sys.argv[2])))
    else:
        sys.exit("usage: python benchmarks/common.py goals DIR | commit")

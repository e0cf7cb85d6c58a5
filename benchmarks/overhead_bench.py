"""What surrounds the kernels: host time, glue aten ops, launches and syncs per call of each op, at tiny shapes.

    python benchmarks/overhead_bench.py                                  # every op, backend and mode on this device
    TRITON_INTERPRET=1 python benchmarks/overhead_bench.py --device cpu  # CPU: eager, cpu, reference and triton
    python benchmarks/overhead_bench.py --quick --ops aspp --backends cpu --out /tmp/o

At tiny tensors a call costs almost nothing but its overhead: Python, the dispatcher, checks, allocations, copies,
layout conversions, cat, launches and host syncs. A fused op only beats eager PyTorch if that overhead is smaller
than what the eager layers spend (docs/performance.md). For conv_bn_relu (1x4x4x4 -> 4, 3x3,
channels_last input), aspp (N=2, C_in=8, C=4, 5x5, rates 1/2/3) and upsample_cross_entropy (N=2, K=3, 4x4 -> 8x8),
every backend that runs here and eager PyTorch (Conv2d -> BatchNorm2d -> ReLU; torchvision's ASPP, model.ASPP
without torchvision; F.interpolate + F.cross_entropy), in train_fwd / eval_fwd (no_grad, training=False) / fwd_bwd,
after warm-up, same parameters every call (grads set to None between calls, outside the measurement):

- host time per call (time.perf_counter around each call: median, p20, p80); on CUDA also the wall time to the
  end of the call's GPU work and its GPU time (CUDA events): host_us close to wall_us means host-bound;
- a census of the aten ops a call runs outside the backend's own kernels, nested ones included (torch.profiler
  CPU events): own kernels are deeplab_ops::bn_* (the C++ stage kernels), convolutions (aten::conv2d,
  aten::convolution, aten::_convolution, aten::mkldnn_convolution, aten::cudnn_convolution*, aten::convolution_
  backward, mkldnn::_convolution_pointwise*, ...) and Triton launches, each with everything nested under it; every
  other aten::* event counts,
  also inside the composite deeplab_ops::*_forward/_backward ops. Categories: allocations, copies (copy, clone,
  to, contiguous, ...; copy_bytes: what their copy_ calls write, shapes x dtype size), cat, reductions,
  elementwise, views (free, counted apart), other; they sum to aten_ops;
- launches: Triton (deeplab_ops.triton.count_launches()), C++ stage kernels (deeplab_ops::bn_* events),
  convolutions (outermost convolution events), and on CUDA every GPU kernel the profiler saw;
- host syncs: aten::item / aten::_local_scalar_dense, aten::nonzero, device-to-host copies and copies from pageable
  host memory to the device (CUDA only);
- triton_specializations: Triton kernel variants the case compiled (JITFunction.device_caches entries added by
  the case, warm-up included; triton_recompiles: those added after warm-up, 0 in a steady state). The Triton
  interpreter compiles nothing: empty there.

Census, launches and syncs are deterministic: they are counted the same on any machine, and tests keep budgets for
them. Times on a shared CPU swing: compare rows of one run only.

First use (opt-in, `--r50-step`; docs/benchmarks.md): one DeepLabV3-R50 training step on the triton backend (fused,
and memory-lean): the Triton specializations its first step compiles (on a GPU the JIT cache entries it adds,
under the interpreter predicted for sm_90 from `count_launches().signatures`, tuning included), its launches, and
the first and a second step's time. The goal, <= 40, is the full-width step's in bf16: a row gets its verdict only
there (fp16 standing in for bf16 under the interpreter, which runs no bf16 on CPU tensors); another dtype or
--step-width says it is not the goal's. `--dry-launches` (with --r50-step, under TRITON_INTERPRET=1 on --device
cpu; otherwise a usage error) skips the kernels' work so the full-width network counts in seconds:

    TRITON_INTERPRET=1 python benchmarks/overhead_bench.py --device cpu --r50-step --dry-launches --step-dtype fp16
    python benchmarks/overhead_bench.py --r50-step                     # a GPU: real compiles, first-step time
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import re
import shlex
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import common
import torch
import torch.nn.functional as F
from torch import nn

OPS = ("conv_bn_relu", "aspp", "upsample_cross_entropy")
MODES = common.MODES
CPU_BACKENDS = ("cpu", "reference", "triton")
CUDA_BACKENDS = ("cuda", "triton", "reference")
BACKENDS = ("cpu", "cuda", "triton", "reference")
CATEGORIES = ("allocs", "copies", "cat", "reductions", "elementwise", "other", "views")

# The rows: the case, its times, its census (per call), its launches and syncs, the environment.
FIELDS = (
    "op", "provider", "mode", "dtype", "shape", "batch", "status",
    "host_us", "host_p20_us", "host_p80_us", "wall_us", "gpu_us", "repeats", "eager_host_us", "host_x_eager",
    "aten_ops", *CATEGORIES, "copy_bytes", "deeplab_ops_events", "bn_stage_calls", "conv_calls",
    "triton_launches", "triton_by_kernel", "gpu_kernels", "syncs", "sync_ops",
    "triton_specializations", "triton_recompiles", "specializations_from", "distinct_kernels", "first_call_s",
    "profiled_calls", "census_detail", "note", "device", "gpu", "machine", "torch", "triton", "git_commit", "time",
)
# The first-use goal (issue 13, item 4): Triton kernel specializations one DeepLabV3-R50 training step compiles, the
# full-width ResNet-50 (--step-width 64) training in bf16 (on a GPU, the default --step-dtype). Under the interpreter
# fp16 stands in for bf16 (it runs no bf16 on CPU tensors; the same element size prunes to the same candidates):
# step_goal gives a verdict for those rows only, and says so for the others (fp32, a TF32 step, a stand-in width).
STEP_SPECIALIZATION_GOAL = 40
STEP_GOAL_WIDTH = 64
STEP_GOAL_DTYPE = "bf16"
INTERPRETER_GOAL_DTYPES = ("bf16", "fp16")
STEP_PROVIDERS = ("triton", "triton-lean")


@dataclass(frozen=True)
class Settings:
    warmup: int  # calls before anything is measured (caches filled, autotuning and compiles done)
    repeats: int  # timed calls, at most
    case_s: float  # ...and at most this long per case (at least min_repeats calls)
    min_repeats: int
    profiled: int  # calls in the census profile (counts are divided by it)


FULL = Settings(warmup=5, repeats=300, case_s=2.0, min_repeats=10, profiled=3)
QUICK = Settings(warmup=2, repeats=20, case_s=0.1, min_repeats=3, profiled=1)
# The Triton interpreter takes 0.05 to 5 s per call at these shapes, and its times say nothing about a GPU: the
# fewest calls that still measure a steady state (one warm-up call fills the caches). --quick times the profiled
# call itself (repeats=0): the profiler's few µs per op are nothing beside the interpreter's seconds.
INTERPRETER_FULL = Settings(warmup=1, repeats=5, case_s=5.0, min_repeats=2, profiled=1)
INTERPRETER_QUICK = Settings(warmup=1, repeats=0, case_s=0.0, min_repeats=0, profiled=1)


# ---- the cases ------------------------------------------------------------------------------------------------


@dataclass
class Case:
    fn: Callable[[], object]  # one call
    params: list[torch.Tensor]  # tensors whose .grad is set to None before each call
    shape: str
    batch: int
    note: str = ""


class EagerConvBNReLU(nn.Sequential):
    """nn.Sequential(Conv2d(bias=False), BatchNorm2d, ReLU): what FusedConvBNReLU replaces."""

    def __init__(self, cin: int, cout: int, k: int, padding: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, k, padding=padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def _conv_case(provider: str, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, list[torch.Tensor], dict]:
    n, cin, size, cout, k = 1, 4, 4, 4, 3
    x = torch.randn(n, cin, size, size, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    if provider == "eager":
        module = EagerConvBNReLU(cin, cout, k, padding=1)
    else:
        from deeplab_ops.nn import FusedConvBNReLU

        module = FusedConvBNReLU(cin, cout, k, padding=1, backend=provider)
    w = torch.empty(cout, cin, k, k, device="meta")
    call = dict(x=x, weight=w, stride=(1, 1), padding=(1, 1), dilation=(1, 1), residual=None)
    return module, [x], dict(call=call, shape=f"{cin}x{size}x{size} ->{cout} k{k} channels_last", batch=n)


def _aspp_case(provider: str, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, list[torch.Tensor], dict]:
    import aspp_bench  # the ASPP benchmark's eager module: torchvision's ASPP (dropout 0), else model.ASPP

    n, cin, size, cout, rates = 2, 8, 5, 4, (1, 2, 3)
    x = torch.randn(n, cin, size, size, device=device, dtype=dtype)
    if provider == "eager":
        module, note = aspp_bench.eager_aspp(cin, rates, cout), aspp_bench.eager_aspp_note()
    else:
        from deeplab_ops.nn import FusedASPP

        module, note = FusedASPP(cin, rates, cout, dropout=0.0, backend=provider), ""
    call = dict(x=x, rates=rates, channels=cout)
    return module, [x], dict(call=call, shape=f"{cin}x{size}x{size} r{'/'.join(map(str, rates))} ->{cout}", batch=n,
                             note=note)


class EagerUpsampleCE(nn.Module):
    """F.cross_entropy(F.interpolate(logits, target's size, bilinear), target): what upsample_cross_entropy fuses."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(up, target, ignore_index=255)


class FusedUpsampleCE(nn.Module):
    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        import deeplab_ops

        return deeplab_ops.upsample_cross_entropy(logits, target, ignore_index=255, backend=self.backend)


def _uce_case(provider: str, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, list[torch.Tensor], dict]:
    n, k, size, out = 2, 3, 4, 8
    logits = torch.randn(n, k, size, size, device=device, dtype=dtype)
    target = torch.randint(0, k, (n, out, out), device=device)
    target[:, 0, :2] = 255  # a few ignored pixels, as at VOC's object borders
    module = EagerUpsampleCE() if provider == "eager" else FusedUpsampleCE(provider)
    call = dict(logits=logits, target=target)
    return module, [logits, target], dict(call=call, shape=f"K{k} {size}x{size} ->{out}x{out}", batch=n)


CASES = {"conv_bn_relu": _conv_case, "aspp": _aspp_case, "upsample_cross_entropy": _uce_case}


def build_case(op: str, provider: str, mode: str, device: torch.device, dtype: torch.dtype) -> tuple[Case, str]:
    """(the case, why `provider` cannot run it here: '' when it can)."""
    module, inputs, info = CASES[op](provider, device, dtype)
    module = module.to(device=device, dtype=dtype)
    training = mode != "eval_fwd"
    call = dict(info["call"])
    if op != "upsample_cross_entropy":
        call["training"] = training
    reason = "" if provider in ("eager", "reference") else common.unavailable(provider, op, device, **call)
    module.train(training)
    first = inputs[0]
    if mode == "eval_fwd":
        def fn():
            with torch.no_grad():
                return module(*inputs)
    elif mode == "train_fwd":
        first.requires_grad_(op == "upsample_cross_entropy")  # the loss's input is an activation with a graph

        def fn():
            return module(*inputs)
    else:
        first.requires_grad_(True)  # in DeepLab the input comes from the backbone: its gradient is needed too
        grad = []

        def fn():
            out = module(*inputs)
            if not grad:
                grad.append(torch.randn_like(out))
            out.backward(grad[0])
    params = [p for p in module.parameters()] + [first]
    return Case(fn, params, info["shape"], info["batch"], info.get("note", "")), reason


# ---- host time ------------------------------------------------------------------------------------------------


def _clear(params: list[torch.Tensor]) -> None:
    for p in params:
        p.grad = None


def time_calls(case: Case, device: torch.device, s: Settings) -> dict:
    """Host µs per call (median, p20, p80); on CUDA, wall µs to the end of the call's GPU work and GPU µs."""
    host, wall, gpu = [], [], []
    cuda = device.type == "cuda"
    start_all = time.perf_counter()
    while len(host) < s.repeats and (len(host) < s.min_repeats or time.perf_counter() - start_all < s.case_s):
        _clear(case.params)
        if cuda:
            torch.cuda.synchronize(device)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        t0 = time.perf_counter()
        case.fn()
        t1 = time.perf_counter()
        if cuda:
            end.record()
            torch.cuda.synchronize(device)
            wall.append((time.perf_counter() - t0) * 1e6)
            gpu.append(begin.elapsed_time(end) * 1e3)
        host.append((t1 - t0) * 1e6)
    q = [common.quantile(host, p) for p in common.QUANTILES]
    return dict(host_us=q[0], host_p20_us=q[1], host_p80_us=q[2], repeats=len(host),
                wall_us=common.quantile(wall, 0.5) if wall else None, gpu_us=common.quantile(gpu, 0.5) if gpu else None)


# ---- census ---------------------------------------------------------------------------------------------------

_ALLOC = re.compile(r"^aten::(empty|empty_like|empty_strided|new_\w+|zeros|zeros_like|ones|ones_like|full|full_like|"
                    r"scalar_tensor|resize_)$")
_COPY = {"copy_", "clone", "to", "_to_copy", "contiguous", "_copy_from", "_copy_from_and_resize", "type_as",
         "_to_dense", "to_dense", "to_mkldnn", "copy"}
_CAT = {"cat", "_cat", "stack", "concat", "concatenate", "hstack", "vstack"}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean", "norm",
               "linalg_vector_norm", "prod", "logsumexp", "argmax", "argmin", "all", "any", "count_nonzero",
               "cumsum", "sum_to_size", "aminmax"}
_ELEMENTWISE = {"add", "sub", "mul", "div", "rsub", "neg", "reciprocal", "rsqrt", "sqrt", "exp", "log", "pow",
                "relu", "threshold", "threshold_backward", "clamp", "clamp_min", "clamp_max", "where", "abs",
                "sigmoid", "addcmul", "addcdiv", "lerp", "fill", "zero", "masked_fill", "eq", "ne", "lt", "le", "gt",
                "ge", "maximum", "minimum", "logical_and", "logical_or", "logical_not", "bitwise_and", "floor",
                "ceil", "round", "sign", "square", "hardtanh", "copysign"}
_VIEWS = {"view", "_reshape_alias", "reshape", "as_strided", "permute", "transpose", "t", "expand", "expand_as",
          "unsqueeze", "squeeze", "slice", "select", "narrow", "split", "split_with_sizes", "chunk", "unbind",
          "flatten", "unflatten", "alias", "detach", "view_as", "_unsafe_view", "unfold", "diagonal", "lift_fresh",
          "movedim", "numpy_T", "resolve_conj", "resolve_neg", "_reshape_copy_or_view", "as_strided_", "indices",
          "values", "real", "imag", "_nested_view_from_buffer", "chalf"}
_SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")
_DTYPE_BYTES = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2, "long int": 8, "int": 4,
                "short int": 2, "signed char": 1, "unsigned char": 1, "bool": 1, "c10::complex<float>": 8,
                "c10::complex<double>": 16, "c10::Float8_e4m3fn": 1, "c10::Float8_e5m2": 1}


def category(name: str) -> str:
    """The census category of an aten op: allocs, copies, cat, reductions, elementwise, views or other."""
    if _ALLOC.match(name):
        return "allocs"
    base = name.removeprefix("aten::")
    stem = base.rstrip("_") if base not in ("copy_", "as_strided_") else base
    if base in _COPY:
        return "copies"
    if base in _CAT:
        return "cat"
    if base in _VIEWS or stem in _VIEWS:
        return "views"
    if base in _REDUCTIONS or stem in _REDUCTIONS:
        return "reductions"
    if stem in _ELEMENTWISE:
        return "elementwise"
    return "other"


def is_convolution(name: str) -> bool:
    """aten's convolutions, and oneDNN's fused convolution + pointwise ops (mkldnn::_convolution_pointwise*: the
    cpu backend's channels_last eval path)."""
    if name.startswith("mkldnn::"):
        return name.removeprefix("mkldnn::").lstrip("_").startswith("convolution")
    if not name.startswith("aten::"):
        return False
    base = name.removeprefix("aten::").lstrip("_")
    return "convolution" in base or base.startswith(("conv", "slow_conv", "thnn_conv", "nnpack_spatial_conv"))


def is_own_kernel(name: str) -> bool:
    """The backend's own kernels, whose nested events the census leaves out: C++ BN stages, convs, Triton."""
    return name.startswith(("deeplab_ops::bn_", "triton::")) or is_convolution(name)


def _ancestors(evt) -> Iterator:
    evt = evt.cpu_parent
    while evt is not None:
        yield evt
        evt = evt.cpu_parent


def _bytes_written(evt) -> int:
    shapes = evt.input_shapes or []
    dtypes = getattr(evt, "input_dtypes", None) or []
    if not shapes or not isinstance(shapes[0], (list, tuple)):
        return 0
    numel = 1
    for d in shapes[0]:
        numel *= d
    size = _DTYPE_BYTES.get(dtypes[0], 4) if dtypes else 4
    return numel * size


def _on_cpu(evt) -> bool:
    return evt.device_type == torch.autograd.DeviceType.CPU


def census(events, calls: int, cuda: bool = False) -> dict:
    """Per-call counts of one profile of `calls` calls (fractions if the calls differ); `cuda`: the profile has
    CUDA activity (GPU kernels are counted)."""
    cpu = [e for e in events if _on_cpu(e)]
    counted = Counter()
    copy_bytes = 0
    for e in cpu:
        if not e.name.startswith("aten::") or is_own_kernel(e.name):
            continue
        if any(is_own_kernel(a.name) for a in _ancestors(e)):
            continue
        counted[e.name] += 1
        if e.name == "aten::copy_":
            copy_bytes += _bytes_written(e)
    by_cat = Counter()
    for name, n in counted.items():
        by_cat[category(name)] += n
    syncs = Counter()
    for e in cpu:
        parents = [a.name for a in _ancestors(e)]
        if e.name == "aten::item" or (e.name == "aten::_local_scalar_dense" and "aten::item" not in parents):
            syncs[e.name] += 1
        elif e.name == "aten::nonzero" and "aten::nonzero" not in parents:
            syncs[e.name] += 1
        elif e.name == "aten::copy_" and not any(p in _SYNC_OPS for p in parents):
            if any("DtoH" in k.name or "Device -> Pageable" in k.name for k in e.kernels):
                syncs["DtoH copy_"] += 1
            elif any("Pageable -> Device" in k.name for k in e.kernels):
                # from pageable host memory: CUDA stages it, waiting for the stream (a blocking copy_ also waits
                # for the copy); from pinned memory with non_blocking=True it is asynchronous, and not counted
                syncs["pageable HtoD copy_"] += 1
    # device-to-host copies show as device events named "Memcpy DtoH"; when the profiler did not tie them to
    # their copy_, count them directly
    if not syncs.get("DtoH copy_"):
        dtoh = sum(1 for e in events if not _on_cpu(e) and "DtoH" in e.name)
        dtoh -= sum(1 for e in cpu if e.name == "aten::_local_scalar_dense")  # item()'s own copy
        if dtoh > 0:
            syncs["DtoH copy_"] = dtoh

    def per_call(n: int) -> float | int:
        return n // calls if n % calls == 0 else round(n / calls, 2)

    # GPU work items: kernels, memcpy and memset (not the GPU-side copies of record_function ranges)
    gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
           and not getattr(e, "is_user_annotation", False) and not e.name.startswith("triton::")]
    convs = [e for e in cpu if is_convolution(e.name) and not any(is_convolution(a.name) for a in _ancestors(e))]
    groups = []
    for cat in CATEGORIES:
        ops = sorted(((k, v) for k, v in counted.items() if category(k) == cat), key=lambda kv: (-kv[1], kv[0]))
        if ops:
            groups.append(f"{cat}: " + ", ".join(f"{k.removeprefix('aten::')}×{per_call(v)}" for k, v in ops))
    detail = "; ".join(groups)
    return {
        "aten_ops": per_call(sum(counted.values())),
        **{c: per_call(by_cat[c]) for c in CATEGORIES},
        "copy_bytes": per_call(copy_bytes),
        "deeplab_ops_events": per_call(sum(1 for e in cpu if e.name.startswith("deeplab_ops::"))),
        "bn_stage_calls": per_call(sum(1 for e in cpu if e.name.startswith("deeplab_ops::bn_"))),
        "conv_calls": per_call(len(convs)),
        "gpu_kernels": per_call(len(gpu)) if cuda else None,
        "syncs": per_call(sum(syncs.values())),
        "sync_ops": ", ".join(f"{k.removeprefix('aten::')}×{per_call(v)}" for k, v in sorted(syncs.items())),
        "census_detail": detail,
    }


@contextlib.contextmanager
def triton_launch_scopes() -> Iterator[None]:
    """Every Triton launch inside a profiler scope named triton::<kernel>: an own kernel in the census (under the
    interpreter a launch runs aten ops on CPU tensors; they are the kernel's work, not glue)."""
    try:
        import triton.runtime.interpreter as interpreter
        import triton.runtime.jit as jit
    except ImportError:
        yield
        return
    # A GPU launch: JITFunction.run. An interpreted one: GridExecutor.__call__ (every Triton from 3.2 runs its grid
    # there; 3.2-3.4 keep InterpretedFunction.run per instance, 3.6 on the class), self.fn the rewritten kernel.
    patched = []
    for cls, attr in ((jit.JITFunction, "run"), (getattr(interpreter, "GridExecutor", None), "__call__")):
        if cls is None or attr not in vars(cls):
            continue
        original = vars(cls)[attr]

        def launch(self, *args, _original=original, **kwargs):
            kernel = self.fn if isinstance(self, getattr(interpreter, "GridExecutor", ())) else self
            name = getattr(kernel, "__name__", type(self).__name__)
            with torch.profiler.record_function(f"triton::{name}"):
                return _original(self, *args, **kwargs)

        setattr(cls, attr, launch)
        patched.append((cls, attr, original))
    try:
        yield
    finally:
        for cls, attr, original in reversed(patched):
            setattr(cls, attr, original)


def count_launches():
    """deeplab_ops.triton.count_launches(): a context manager yielding .total and .by_kernel."""
    import deeplab_ops.triton

    counter = getattr(deeplab_ops.triton, "count_launches", None)
    if counter is None:
        raise RuntimeError("deeplab_ops.triton.count_launches() is missing: this benchmark counts Triton launches "
                           "with it (issue 12); build from a tree that has it")
    return counter()


def profile_calls(case: Case, device: torch.device, calls: int, triton: bool) -> dict:
    """The census of `calls` steady-state calls, and for triton their launches."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    launches, host = None, []
    with contextlib.ExitStack() as stack:
        if triton:
            launches = stack.enter_context(count_launches())
        stack.enter_context(triton_launch_scopes())
        common.synchronize(device)
        with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
            for _ in range(calls):
                _clear(case.params)
                t0 = time.perf_counter()
                case.fn()
                host.append((time.perf_counter() - t0) * 1e6)
            common.synchronize(device)
    row = census(prof.events(), calls, cuda=device.type == "cuda")
    row["profiled_host_us"] = host
    if launches is not None:
        total = launches.total
        row["triton_launches"] = total // calls if total % calls == 0 else round(total / calls, 2)
        row["triton_by_kernel"] = ", ".join(f"{k}×{v / calls:g}" for k, v in sorted(dict(launches.by_kernel).items()))
    return row


# ---- Triton specializations -----------------------------------------------------------------------------------


def triton_disk_cache() -> tuple[str, int]:
    """Triton's on-disk kernel cache: its folder ($TRITON_CACHE_DIR, else ~/.triton/cache) and how many entries it
    holds (one per compiled kernel, plus a few of Triton's own helpers). Kernels an earlier process compiled load from
    there: a first step's time with a full cache is a later run's, with an empty one a new user's."""
    from deeplab_ops.common import TUNING_FOLDER, triton_cache_dir

    path = triton_cache_dir()
    try:
        with os.scandir(path) as entries:  # (deeplab_ops' kept tuning winners may be a folder there: not a kernel)
            return path, sum(1 for e in entries if e.is_dir() and e.name != TUNING_FOLDER)
    except OSError:  # not there yet: nothing compiled on this machine
        return path, 0


def kept_winners() -> tuple[str | None, int]:
    """The folder of deeplab_ops' kept tuning winners that this Triton and these kernel sources read
    (deeplab_ops.triton.launch.kept_folder; None where off) and how many it holds: keys a later run loads untimed,
    compiling only the winner (another pixel-count bucket is still timed)."""
    from deeplab_ops.triton import launch

    path = launch.kept_folder()
    try:
        return path, 0 if path is None else sum(1 for name in os.listdir(path) if name.endswith(".json"))
    except OSError:
        return path, 0


def triton_specializations() -> int | None:
    """Compiled variants held by deeplab_ops' Triton kernels: the sum over the JITFunctions of its loaded
    deeplab_ops.triton modules (each counted once, wherever imported) of their per-device kernel caches
    (`JITFunction.device_caches[device][0]`, triton 3.2 to 3.8). None under the interpreter (nothing is
    compiled) or where triton keeps its cache elsewhere."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return None
    found, total, seen = False, 0, set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("deeplab_ops.triton.") or module is None:
            continue
        for obj in vars(module).values():
            caches = getattr(obj, "device_caches", None) if isinstance(obj, JITFunction) else None
            if caches is None or id(obj) in seen:
                continue
            seen.add(id(obj))
            found = True
            total += sum(len(c[0]) for c in caches.values())
    return total if found else None


# ---- first use: a whole DeepLabV3 training step on the triton backend ------------------------------------------


@dataclass(frozen=True)
class StepConfig:
    depth: int = 50
    width: int = 64  # the backbone's base width: 64 is ResNet-50's; smaller gives a stand-in with the same layers
    size: int = 513  # square crop
    batch: int = 2
    output_stride: int = 16
    num_classes: int = 21

    def label(self) -> tuple[str, str]:
        """(op, shape) of the step's row: op names the network, shape the input."""
        op = f"deeplabv3_r{self.depth}" + (f" width {self.width}" if self.width != 64 else "")
        return op, f"3x{self.size}x{self.size} os{self.output_stride} K{self.num_classes}"


def build_step(provider: str, device: torch.device, dtype: torch.dtype, cfg: StepConfig) -> Callable[[], object]:
    """One training step of the fused DeepLabV3 on triton (train_bench's step: zero_grad, forward, loss, backward,
    SGD); triton-lean: memory_efficient fused ops and upsample_cross_entropy, as train.py --fused-ops
    --memory-efficient trains."""
    import train_bench

    from deeplab_ops.nn import fuse_modules
    from model import deeplabv3_resnet

    lean = provider.endswith(train_bench.LEAN)
    net = deeplabv3_resnet(cfg.depth, num_classes=cfg.num_classes, output_stride=cfg.output_stride, width=cfg.width)
    fuse_modules(net, backend="triton", memory_efficient=lean)
    net.to(device=device, dtype=dtype)
    x = torch.randn(cfg.batch, 3, cfg.size, cfg.size, device=device, dtype=dtype)
    target = torch.randint(0, cfg.num_classes, (cfg.batch, cfg.size, cfg.size), device=device)
    fn, _ = train_bench.step_case("train_step", net, x, target, compiled=False, lean=lean)
    return fn


def _signatures(count) -> set | None:
    """The distinct kernel specializations a count_launches() block saw (LaunchCount.signatures, where this
    deeplab_ops records them; None where it does not)."""
    sigs = getattr(count, "signatures", None)
    return None if sigs is None else set(sigs)


@contextlib.contextmanager
def dry_launches() -> Iterator[None]:
    """Inside the block the Triton interpreter runs no kernel: launches still go through deeplab_ops' launcher (so
    count_launches() counts them and records their signatures) but compute nothing. Values come out garbage;
    shapes, dtypes, strides and the launches' arguments do not: what a specialization count needs, in seconds
    instead of the interpreter's minutes or hours. Interpreter only."""
    from triton.runtime.interpreter import GridExecutor  # where every interpreted launch runs its grid (3.2-3.8)

    original = GridExecutor.__call__

    def run(self, *args, **kwargs):
        return None

    GridExecutor.__call__ = run
    try:
        yield
    finally:
        GridExecutor.__call__ = original


# The sm_90 GPU the first-use prediction stands for: an H100 SXM / H200 (132 SMs, 227 KiB of shared memory per
# block), whose sizes decide the wgrad kernels' split count and the shared-memory pruning.
PREDICTED_GPU = {"sms": 132, "smem_limit": 232448}


@contextlib.contextmanager
def gpu_tuning_compiles(hopper: bool = True) -> Iterator[None]:
    """Inside the block (the Triton interpreter), each tuned launch also makes dry launches, counted by
    count_launches(), of what a GPU compiles for it: every pruned candidate configuration (sm_90's list, or sm_80's
    with hopper=False) the first time its tuning key is met (the autotuner compiles and times them all), and the
    first candidate later (a stand-in for the key's winner: one compile per new argument class either way). The
    interpreter's own configuration is launched uncounted. Without this, the signatures the interpreter's launches
    leave predict a GPU that never tunes: one fixed configuration everywhere. With tuning off
    (DEEPLAB_OPS_AUTOTUNE=off, or deterministic algorithms), the first candidate only, as such a GPU runs. The
    launchers see that GPU's sizes (PREDICTED_GPU: the wgrad split counts, shared-memory pruning, float32 on TF32
    where cuDNN's setting allows it, the BatchNorm kernels' GPU blocks), which the kernels' arguments and the
    pruning follow; the interpreter computes with them as well (more programs, the same results)."""
    import deeplab_ops.triton.aspp as triton_aspp
    import deeplab_ops.triton.bn_kernels as bn_kernels
    import deeplab_ops.triton.conv_engine as conv_engine
    from deeplab_ops.triton import counting, launch

    def split_count(device, programs, pixel_tiles):
        return conv_engine.gpu_split_count(PREDICTED_GPU["sms"], programs, pixel_tiles)

    def fit_sizes(t):
        fma = t.dtype == torch.float32 and conv_engine.dot_precision(t.dtype, gpu) == "ieee"
        return conv_engine.gpu_fit_sizes(t, fma, PREDICTED_GPU["smem_limit"], hopper)

    gpu_sizes = [
        (conv_engine, "split_count", split_count), (triton_aspp, "split_count", split_count),
        (conv_engine, "fit_sizes", fit_sizes), (triton_aspp, "fit_sizes", fit_sizes),
        (bn_kernels, "interpreter_active", lambda: False)]
    # Every name replaced must be the one the kernels' code reads: a rename there must fail here, not leave the
    # prediction silently on the interpreter's sizes.
    missing = [f"{m.__name__}.{name}" for m, name, _ in gpu_sizes if not hasattr(m, name)]
    if missing:
        raise AttributeError(f"predicting the GPU's launches replaces {', '.join(missing)}, which no longer exist")
    saved = [(m, name, getattr(m, name)) for m, name, _ in gpu_sizes]

    real = launch.run_tuned
    seen = set()
    gpu = torch.device("cuda", 0)

    def run_tuned(spec, device, dtype, sizes, meta, run, config=None):
        key = launch.tuning_key(spec, gpu, dtype, sizes, meta)
        configs = spec.prune(spec.configs(hopper), sizes)
        tuning = key not in seen and config is None and launch.autotune_mode() != "off" and \
            not torch.are_deterministic_algorithms_enabled()
        given = [config] if config is not None else None  # a caller's configuration: that one compiles
        with counting.paused(), count_launches() as compiled, dry_launches():
            for candidate in given or [launch.config_dict(c) for c in (configs if tuning else configs[:1])]:
                run(candidate)
        if config is None:
            seen.add(key)
        # the launch itself counts (total, by kernel) with what a GPU compiles for it, not its own signature
        outer = counting.active_counts()
        before = [set(c.signatures) for c in outer]
        try:
            return real(spec, device, dtype, sizes, meta, run, config)
        finally:
            for c, signatures in zip(outer, before, strict=True):
                c.signatures.clear()
                c.signatures.update(signatures | compiled.signatures)

    modules = (launch, conv_engine, triton_aspp)
    stray = [m.__name__ for m in modules if getattr(m, "run_tuned", None) is not real]
    if stray:
        raise AttributeError(f"predicting the GPU's launches replaces run_tuned, which {', '.join(stray)} no longer "
                             "takes from deeplab_ops.triton.launch")
    for m in modules:
        m.run_tuned = run_tuned
    for m, name, value in gpu_sizes:
        setattr(m, name, value)
    try:
        yield
    finally:
        for m in modules:
            m.run_tuned = real
        for m, name, value in saved:
            setattr(m, name, value)


def run_step(provider: str, device: torch.device, dtype_name: str, cfg: StepConfig, quick: bool, env: dict,
             dry: bool = False) -> dict:
    """A row for the first training step(s) of the fused network on triton: launches, distinct kernels and the
    specializations the first step compiles (GPU: JIT cache entries it adds; interpreter: predicted from the
    launches' signatures), the first step's wall time and, unless --quick on CPU, a second step's (recompiles)."""
    op, shape = cfg.label()
    row = dict.fromkeys(FIELDS)
    row.update(env, op=op, provider=provider, mode="train_step", dtype=dtype_name, shape=shape, batch=cfg.batch)
    cuda = device.type == "cuda"
    notes = []
    try:
        if dry and (cuda or not _interpreter()):
            raise ValueError("dry launches (--dry-launches) need the Triton interpreter on CPU tensors "
                             "(TRITON_INTERPRET=1, --device cpu): a GPU compiles and runs every launch")
        fn = build_step(provider, device, common.DTYPES[dtype_name], cfg)
        if not cuda:  # the interpreter: predict what a GPU's tuning compiles (gpu_tuning_compiles)
            untuned = fn

            def fn():
                with gpu_tuning_compiles():
                    return untuned()
        if dry:
            inner = fn

            def fn():
                with dry_launches():
                    return inner()

            notes.append("dry launches: Triton kernels counted, not run (values garbage, arguments real); the step "
                         "times are the CPU glue's alone")
        if cuda:
            cache_dir, cached = triton_disk_cache()
            tuning_dir, kept = kept_winners()
            notes.append(f"Triton's on-disk cache ({cache_dir}) held {cached} entries and deeplab_ops' tuning folder "
                         f"({tuning_dir or 'off'}) {kept} kept winners before the first step: "
                         + ("first_call_s is a new user's, every kernel compiled and every key timed here"
                            if cached == 0 and kept == 0 else
                            "kernels an earlier run compiled load from it, and a kept winner's key is neither timed "
                            "nor its other candidates compiled, so first_call_s and the specializations may be a later "
                            "run's (an empty TRITON_CACHE_DIR, DEEPLAB_OPS_TUNING_CACHE unset, gives a new user's)"))
        before = triton_specializations()
        with count_launches() as first:
            t0 = time.perf_counter()
            fn()
            common.synchronize(device)
            row["first_call_s"] = time.perf_counter() - t0
        after = triton_specializations()
        row.update(triton_launches=first.total, distinct_kernels=len(first.by_kernel),
                   triton_by_kernel=", ".join(f"{k}×{v}" for k, v in sorted(first.by_kernel.items())))
        first_sigs = _signatures(first)
        if before is not None and after is not None:
            row.update(triton_specializations=after - before, specializations_from="JIT cache entries")
        elif first_sigs is not None:
            row.update(triton_specializations=len(first_sigs),
                       specializations_from="launch signatures with sm_90 tuning (predicted)")
            from deeplab_ops.triton import launch

            tuning = ("every pruned candidate configuration of a new tuning key (the autotuner compiles each; "
                      "deeplab_ops compiles them concurrently)" if launch.autotune_mode() != "off" else
                      "tuning off (DEEPLAB_OPS_AUTOTUNE=off): each key's first candidate")
            notes.append("interpreter: specializations predicted for an sm_90 GPU from count_launches().signatures: "
                         f"{tuning}, one per distinct signature")
        else:
            notes.append("count_launches() records no signatures in this deeplab_ops (LaunchCount.signatures is "
                         "being added): no prediction; distinct_kernels is a lower bound")
        if cuda or not quick:  # a second step: steady state (no new specializations expected)
            with count_launches() as second:
                host = time_calls(Case(fn, [], shape, cfg.batch), device, Settings(0, 1, 0.0, 1, 0))
            row.update({k: host[k] for k in ("host_us", "host_p20_us", "host_p80_us", "wall_us", "gpu_us")},
                       repeats=1)
            later = triton_specializations()
            second_sigs = _signatures(second)
            if after is not None and later is not None:
                row["triton_recompiles"] = later - after
            elif first_sigs is not None and second_sigs is not None:
                row["triton_recompiles"] = len(second_sigs - first_sigs)
        if row["triton_specializations"] is not None:
            notes.append(step_goal(row["triton_specializations"], dtype_name, cfg.width, cuda))
        if not cuda and not dry:
            notes.append(f"first_call_s is the interpreter's time at a {cfg.size}x{cfg.size} crop: nothing like a "
                         "GPU's compile time")
        if cfg.size != 513:
            notes.append(f"a {cfg.size}x{cfg.size} crop instead of 513x513: the count follows channel counts, kernel "
                         "sizes, strides, dtypes and divisibility classes, not resolution, but a tiny map can change "
                         "a size bucket or a divisibility class")
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001  (the row says why)
        message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        print(f"  error in the {provider} training step: {message}", file=sys.stderr)
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
        row["status"] = "error"
        notes.append(message[:300])
    finally:
        if cuda:
            torch.cuda.empty_cache()
    row["note"] = "; ".join(notes) or None
    return row


def step_goal(specializations: int, dtype_name: str, width: int, cuda: bool) -> str:
    """The first-use goal's verdict on a step row's count, "met" or "NOT met", where the row is the goal's step: the
    full-width network (STEP_GOAL_WIDTH) in bf16, fp16 standing in under the interpreter (cuda False). Another
    dtype or width says that this run is not the goal's and gives no verdict: fp32 compiles other candidates (the
    count was 25 against half precision's 85 at one commit), and a stand-in's narrow layers other divisibility
    classes."""
    goal = f"goal <= {STEP_SPECIALIZATION_GOAL} specializations per step"
    dtypes = (STEP_GOAL_DTYPE,) if cuda else INTERPRETER_GOAL_DTYPES
    if dtype_name in dtypes and width == STEP_GOAL_WIDTH:
        verdict = "met" if specializations <= STEP_SPECIALIZATION_GOAL else "NOT met"
        return f"{goal}: {verdict}" + (f" ({dtype_name} standing in for {STEP_GOAL_DTYPE})"
                                       if dtype_name != STEP_GOAL_DTYPE else "")
    differs = ([f"dtype {dtype_name}"] * (dtype_name not in dtypes)
               + [f"width {width} (a stand-in)"] * (width != STEP_GOAL_WIDTH))
    goal_step = (f"--step-width {STEP_GOAL_WIDTH} --step-dtype {STEP_GOAL_DTYPE}" if cuda else
                 f"--step-width {STEP_GOAL_WIDTH} --step-dtype fp16 in the interpreter, fp16 standing in for "
                 f"{STEP_GOAL_DTYPE}")
    return (f"{goal}: no verdict, this run's {' and '.join(differs)} {'are' if len(differs) > 1 else 'is'} not "
            f"the goal's (the full-width ResNet-50 in {STEP_GOAL_DTYPE}: {goal_step})")


def step_row(provider: str, device: torch.device, dtype_name: str, cfg: StepConfig, quick: bool, env: dict,
             dry: bool = False) -> dict:
    """run_step, or a skipped row saying why triton cannot run here (CPU tensors without the interpreter)."""
    dtype = common.DTYPES[dtype_name]
    x = torch.empty((2, 8, 5, 5), device=device, dtype=dtype)
    w = torch.empty((8, 8, 3, 3), device="meta", dtype=dtype)
    reason = common.unavailable("triton", "conv_bn_relu", device, x=x, weight=w, stride=(1, 1), padding=(1, 1),
                                dilation=(1, 1), training=True, residual=None)
    if not reason:
        return run_step(provider, device, dtype_name, cfg, quick, env, dry)
    op, shape = cfg.label()
    row = dict.fromkeys(FIELDS)
    row.update(env, op=op, provider=provider, mode="train_step", dtype=dtype_name, shape=shape, batch=cfg.batch,
               status="skipped", note=reason)
    return row


# ---- running --------------------------------------------------------------------------------------------------


def settings_for(provider: str, device: torch.device, quick: bool) -> Settings:
    if provider == "triton" and device.type == "cpu":
        return INTERPRETER_QUICK if quick else INTERPRETER_FULL
    return QUICK if quick else FULL


def run_case(op: str, provider: str, mode: str, device: torch.device, dtype_name: str, quick: bool, env: dict) -> dict:
    """One row: build the case, warm it up, time it, profile it; errors become the row's note."""
    s = settings_for(provider, device, quick)
    row = dict.fromkeys(FIELDS)
    row.update(env, op=op, provider=provider, mode=mode, dtype=dtype_name)
    try:
        case, reason = build_case(op, provider, mode, device, common.DTYPES[dtype_name])
        row.update(shape=case.shape, batch=case.batch, note=case.note or None)
        if reason:
            row.update(status="skipped", note=reason)
            return row
        triton = provider == "triton"
        before = triton_specializations() if triton else None
        for _ in range(s.warmup):
            _clear(case.params)
            case.fn()
        common.synchronize(device)
        warm = triton_specializations() if triton else None
        if s.repeats:
            row.update(time_calls(case, device, s))
        census_row = profile_calls(case, device, s.profiled, triton)
        profiled_host = census_row.pop("profiled_host_us")
        if not s.repeats:
            q = [common.quantile(profiled_host, p) for p in common.QUANTILES]
            row.update(host_us=q[0], host_p20_us=q[1], host_p80_us=q[2], repeats=0)
            row["note"] = "host time of the profiled call (Triton interpreter, --quick)"
        row.update(census_row)
        row["profiled_calls"] = s.profiled
        after = triton_specializations() if triton else None
        if before is not None and after is not None:
            row["triton_specializations"] = after - before
            row["triton_recompiles"] = after - warm
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001  (one broken provider never stops a run: the row says why)
        message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        print(f"  error in {provider} {op} {mode}: {message}", file=sys.stderr)
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
        row.update(status="error", note=message[:300])
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def fill_eager(rows: list[dict]) -> None:
    """eager_host_us and host_x_eager (this row's host time / eager's: above 1 is slower) per op and mode."""
    eager = {(r["op"], r["mode"]): r["host_us"] for r in rows if r["provider"] == "eager" and r["status"] == "ok"}
    for r in rows:
        base = eager.get((r["op"], r["mode"]))
        if r["status"] == "ok" and base:
            r["eager_host_us"] = base
            r["host_x_eager"] = r["host_us"] / base


def machine_name(device: torch.device) -> str:
    """A short file-name-safe name of the machine: the GPU's ('h200'), else the CPU model's ('xeon-8375c')."""
    raw = torch.cuda.get_device_name(device) if device.type == "cuda" else common.cpu_name()
    raw = re.sub(r"\((R|TM|tm|r)\)|@.*$|\b(CPU|Processor|NVIDIA|Intel|AMD|GenuineIntel|Core|with .*)\b", " ", raw)
    slug = re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")
    return slug or "unknown"


def environment(device: torch.device) -> dict:
    env = common.environment(device)  # git_commit: $GIT_COMMIT when set (common.git_commit)
    env["machine"] = machine_name(device)
    return env


# ---- output ---------------------------------------------------------------------------------------------------


def _fmt(v, digits: int = 3) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


TABLE = (
    ("op", "op"), ("mode", "mode"), ("provider", "provider"), ("host_us", "host µs"), ("host_p20_us", "p20"),
    ("host_p80_us", "p80"), ("host_x_eager", "host/eager"), ("wall_us", "wall µs"), ("gpu_us", "GPU µs"),
    ("aten_ops", "aten ops"), ("allocs", "alloc"), ("copies", "copy"), ("copy_bytes", "copy B"), ("cat", "cat"),
    ("reductions", "red"), ("elementwise", "elem"), ("other", "other"), ("views", "views"),
    ("bn_stage_calls", "bn_*"), ("conv_calls", "conv"), ("triton_launches", "triton"), ("gpu_kernels", "GPU krn"),
    ("syncs", "syncs"), ("triton_specializations", "specs"), ("status", "status"),
)


STEP_TABLE = (
    ("op", "network"), ("shape", "input"), ("batch", "N"), ("dtype", "dtype"), ("provider", "provider"),
    ("triton_specializations", "specializations"), ("specializations_from", "counted from"),
    ("triton_recompiles", "2nd step"), ("distinct_kernels", "kernels"), ("triton_launches", "launches"),
    ("first_call_s", "first step s"), ("host_us", "2nd step host µs"), ("wall_us", "2nd step wall µs"),
    ("status", "status"),
)


def step_markdown(step_rows: list[dict]) -> list[str]:
    """The first-use section: one line per training-step row, the goal, and the launches by kernel."""
    if not step_rows:
        return []
    lines = [
        "## First use: one DeepLabV3 training step on triton",
        "",
        f"specializations: Triton kernel variants the first step compiles (goal <= {STEP_SPECIALIZATION_GOAL} for "
        f"the full-width step in {STEP_GOAL_DTYPE}, fp16 standing in under the interpreter: each row's note gives the "
        "verdict, or says that its dtype or width is not the goal's): on "
        "a GPU the JIT cache entries it adds (autotuning candidates included), under the interpreter predicted for an "
        "sm_90 GPU from the distinct launch signatures (count_launches().signatures), each tuned launch counted as the "
        "candidate configurations a GPU compiles for it. 2nd step: those a second step adds (0 in a "
        "steady state). kernels: distinct kernels launched (a lower bound on specializations). first step s: wall "
        "time of the first step (compile and autotuning on a GPU; on CPU the interpreter's pace, or with dry "
        "launches the CPU glue's alone).",
        "",
        "| " + " | ".join(h for _, h in STEP_TABLE) + " |",
        "|" + "|".join("---" for _ in STEP_TABLE) + "|",
    ]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k, _ in STEP_TABLE) + " |" for r in step_rows]
    lines.append("")
    for r in step_rows:
        lines.append(f"- **{r['op']} {r['provider']}**: {r['note'] or ''}"
                     + (f"; launches: {r['triton_by_kernel']}" if r.get("triton_by_kernel") else ""))
    return lines + [""]


def markdown(rows: list[dict], env: dict, command: str, meta: list[str], step_rows: list[dict] | None = None) -> str:
    used = [(k, h) for k, h in TABLE if any(r.get(k) is not None for r in rows)]
    machine = env['gpu'].removeprefix('none (CPU: ').removesuffix(')')
    lines = [
        f"# {'Host overhead per call' if rows else 'First use of a training step on triton'}: {machine}",
        "",
        "Rerun (from the repository root; writes this file and its .csv):",
        "",
        f"    {command}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}, {env['time']}. ",
        *([f"{m} " for m in meta] if rows else []),
        "",
    ]
    if not rows:
        return "\n".join(lines + step_markdown(step_rows or []))
    lines += [
        "Per call, steady state. host µs: time.perf_counter around the call (median, p20, p80); host/eager: host µs "
        "/ eager's (above 1: slower than eager; the other scripts' \"x eager\" is the inverse, eager's time / the "
        "row's; the CSV's column is host_x_eager). aten ops: every aten op outside the backend's own kernels (bn_* "
        "stages, convolutions, Triton launches), nested ones included = alloc + copy + cat + red(uctions) + "
        "elem(entwise) + other + views; copy B: bytes their copy_ calls write. bn_*: C++ stage kernel calls; conv: "
        "convolution calls; triton: Triton launches; syncs: item/_local_scalar_dense, nonzero, device-to-host "
        "copies, pageable host-to-device copies; specs: Triton specializations compiled (none under the "
        "interpreter). A no-op .to() or .contiguous() still counts as a call (0 bytes).",
        "",
    ]
    lines += step_markdown(step_rows or [])
    lines += summary(rows) + [
        "",
        "## Every row",
        "",
        "| " + " | ".join(h for _, h in used) + " |",
        "|" + "|".join("---" for _ in used) + "|",
    ]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k, _ in used) + " |" for r in rows]
    notes = sorted({(r["provider"], r["status"], r["note"]) for r in rows if r.get("note")})
    if notes:
        lines += ["", "Notes:", ""] + [f"- {p} ({status}): {note}" for p, status, note in notes]
    lines += ["", "## Glue ops per call (outside the backend's own kernels)", ""]
    for r in rows:
        if r["status"] != "ok":
            continue
        launches = f"; triton launches: {r['triton_by_kernel']}" if r.get("triton_by_kernel") else ""
        syncs = f"; syncs: {r['sync_ops']}" if r.get("sync_ops") else ""
        lines.append(f"- **{r['op']} {r['mode']} {r['provider']}**: {r['census_detail'] or 'none'}{launches}{syncs}")
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> list[str]:
    """Markdown lines: per op and mode, each provider's host µs (host/eager), glue aten ops (views apart) and
    syncs."""
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    lines = [
        "## Summary: host µs per call (host/eager: above 1 is slower) · glue aten ops without views (+ views) · "
        "syncs",
        "",
        "| op | mode | " + " | ".join(providers) + " |",
        "|---|---|" + "---|" * len(providers),
    ]
    cells = {(r["op"], r["mode"], r["provider"]): r for r in rows}
    for op, mode in dict.fromkeys((r["op"], r["mode"]) for r in rows):
        out = []
        for p in providers:
            r = cells.get((op, mode, p))
            if r is None or r["status"] != "ok":
                out.append(r["status"] if r else "-")
                continue
            ratio = f" ({_fmt(r['host_x_eager'])})" if r.get("host_x_eager") is not None and p != "eager" else ""
            out.append(f"{_fmt(r['host_us'])}{ratio} · {_fmt(r['aten_ops'] - r['views'])} (+{_fmt(r['views'])}) · "
                       f"{_fmt(r['syncs'])}")
        lines.append(f"| {op} | {mode} | " + " | ".join(out) + " |")
    return lines


def write_csv(rows: list[dict], path: Path, partial: bool = False) -> None:
    """NAME.csv, replaced in one step; `partial` (the saves during a run): a last row of status partial says so."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k])
                         for k in FIELDS})
    if partial:
        writer.writerow({"status": common.PARTIAL_STATUS, "note": common.PARTIAL_NOTE})
    common.write_text_atomic(path, buffer.getvalue())


PARTIAL_MD = f"**Partial**: {common.PARTIAL_WHY}: the rows below are the cases finished so far."  # (under the title)


def print_table(rows: list[dict]) -> None:
    used = [(k, h) for k, h in TABLE if any(r.get(k) is not None for r in rows)]
    cells = [[_fmt(r.get(k)) for k, _ in used] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(used)]
    print("  ".join(h.ljust(w) for (_, h), w in zip(used, widths, strict=True)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"),
                        type=common.device_name, help="default: cuda when visible")
    parser.add_argument("--ops", type=common.csv_list(str, OPS), default=None,
                        help=f"comma list of {OPS}; default: all of them, none with --r50-step alone")
    parser.add_argument("--backends", type=common.csv_list(str, ("eager", *BACKENDS)), default=None,
                        help=f"comma list of eager and {BACKENDS}; default: eager and {CPU_BACKENDS} on cpu (triton "
                             f"only with TRITON_INTERPRET=1, else recorded as skipped), eager and {CUDA_BACKENDS} on "
                             "cuda. eager rows are always run: the others are compared with them")
    parser.add_argument("--modes", type=common.csv_list(str, MODES), default=list(MODES),
                        help=f"comma list of train_fwd, eval_fwd (no_grad, training=False), fwd_bwd (default: "
                             f"{','.join(MODES)})")
    parser.add_argument("--dtype", choices=tuple(common.DTYPES), default="fp32",
                        help="one dtype for every case: fp32 (TF32 off), tf32, bf16 or fp16 (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="few calls per case (seconds; tests, smoke runs)")
    parser.add_argument("--out", type=common.out_folder, default="bench_out",
                        help="folder for NAME.csv and NAME.md, created if missing (default: %(default)s)")
    parser.add_argument("--name", type=common.file_stem, default=None,
                        help="file stem (default: overhead-<device>-<machine>-<UTC date>, e.g. overhead-cpu-xeon-"
                             "2026-11-28)")
    parser.add_argument("--threads", type=common.cpu_threads, default=None,
                        help="torch CPU threads (default: torch's); 1 avoids oversubscription on a shared machine")
    parser.add_argument("--budget-s", type=common.budget_seconds, default=None,
                        help="wall-clock budget: cases left when it is spent are recorded as skipped (default: none)")
    step = parser.add_argument_group("first use: one DeepLabV3 training step on the triton backend (opt-in, runs "
                                     "first: the specializations it compiles are counted in a fresh process)")
    step.add_argument("--r50-step", action="store_true",
                      help=f"count the Triton specializations the first training step compiles (goal <= "
                           f"{STEP_SPECIALIZATION_GOAL} at full width in bf16) and time it; on CPU (interpreter) "
                           "predicted from the launches")
    step.add_argument("--step-providers", type=common.csv_list(str, STEP_PROVIDERS), default=list(STEP_PROVIDERS),
                      help="triton (fused=True) and/or triton-lean (memory_efficient + upsample_cross_entropy) "
                           f"(default: {','.join(STEP_PROVIDERS)})")
    step.add_argument("--step-size", type=common.int_at_least(16, "pixels: the largest output stride"), default=None,
                      help="square crop (default 513 on cuda, 33 on cpu)")
    step.add_argument("--step-batch", type=common.int_at_least(2, "images: training BatchNorm needs 2"), default=None,
                      help="batch (default 16 on cuda, 2 on cpu)")
    step.add_argument("--step-width", type=common.int_at_least(1, "the ResNet's base width"), default=64,
                      help="backbone base width: 64 is ResNet-50; smaller is a stand-in with the same layers (tests) "
                           "(default: %(default)s)")
    step.add_argument("--step-dtype", choices=tuple(common.DTYPES), default=None,
                      help="default bf16 on cuda, fp32 on cpu (the interpreter, which runs no bf16 on CPU tensors: "
                           "fp16 stands in for the goal's bf16 there)")
    step.add_argument("--dry-launches", action="store_true",
                      help="with --r50-step, in the interpreter only (TRITON_INTERPRET=1, --device cpu): count the "
                           "step's Triton launches and their signatures without running the kernels (seconds "
                           "instead of the interpreter's hours at full width; values garbage)")
    args = parser.parse_args(argv)
    if not args.r50_step:  # the step's flags read without the step: an error, as --dry-launches (nothing is ignored)
        given = [f"--{name.replace('_', '-')}" for name in ("step_providers", "step_size", "step_batch", "step_width",
                                                            "step_dtype")
                 if getattr(args, name) != parser.get_default(name)]
        if given:
            parser.error(f"argument {given[0]}: needs --r50-step (the first-use training step it configures)")
    if args.dry_launches and not args.r50_step:
        parser.error("argument --dry-launches: needs --r50-step (it skips the kernels of that training step's "
                     "launches; the per-op cases always run theirs)")
    if args.dry_launches and (args.device != "cpu" or not _interpreter()):
        got = ("--device cuda (a GPU compiles and runs every launch)" if args.device != "cpu"
               else "TRITON_INTERPRET is not 1")
        parser.error("argument --dry-launches: needs the Triton interpreter on CPU tensors (TRITON_INTERPRET=1 "
                     f"and --device cpu); here {got}")
    common.check_dtypes(parser, args.device, "--dtype", [args.dtype])
    common.check_dtypes(parser, args.device, "--step-dtype", [args.step_dtype] if args.step_dtype else None)
    if args.ops is None:
        args.ops = [] if args.r50_step else list(OPS)
    device = common.resolve_device(args)
    common.set_precision(args.dtype)
    backends = [b for b in (args.backends or (CUDA_BACKENDS if device.type == "cuda" else CPU_BACKENDS))
                if b != "eager"]
    providers = ["eager", *backends]
    env = environment(device)
    name = args.name or f"overhead-{device.type}-{env['machine']}-{env['time'][:10]}"
    common.check_output_files(parser, args.out, name, [f"{name}.csv", f"{name}.md"])
    variables = common.run_variables()  # (the other scripts keep them in their JSON's meta)
    command = " ".join(  # what triton ran under, the per-op cases' or the first-use step's: the rerun needs it too;
        # and the other variables set (deeplab_ops' tuning, the cpu backend's Winograd route, glibc's malloc)
        ["TRITON_INTERPRET=1"] * (_interpreter() and ("triton" in backends or args.r50_step))
        + [f"{k}={shlex.quote(v)}" for k, v in variables.items() if v and k != "TRITON_INTERPRET"]
        + ["python", "benchmarks/overhead_bench.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]
    )
    print(common.header(env), flush=True)
    cuda = device.type == "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = [f"Calls per case ({'--quick' if args.quick else 'full'}): {settings_for('eager', device, args.quick)}"
            + (f"; triton in the interpreter: {settings_for('triton', device, args.quick)}" if _interpreter() else "")
            + f". torch threads {torch.get_num_threads()}; dtype {args.dtype}; Triton interpreter "
            f"{'on' if _interpreter() else 'off'}; "
            + ", ".join(f"{k}={v}" if v is not None else f"{k} unset" for k, v in variables.items()
                        if k != "TRITON_INTERPRET") + "."]
    budget = common.Budget(args.budget_s)
    step_rows, rows = [], []

    common.claim_results(out, name)
    common.set_aside_earlier_results(out, [f"{name}.csv", f"{name}.md"])

    def save(partial: bool = True) -> None:
        """The rows so far, to NAME.csv and NAME.md: a run stopped by a timeout keeps every finished case (and says
        that it is partial: the last CSV row, the Markdown's first paragraph), each row's host/eager filled as far
        as its eager row has run, as the other scripts fill their speedups on every save."""
        fill_eager(rows)
        write_csv(step_rows + rows, out / f"{name}.csv", partial)
        text = markdown(rows, env, command, meta, step_rows)
        if partial:
            title, _, body = text.partition("\n")
            text = f"{title}\n\n{PARTIAL_MD}\n{body}"
        common.write_text_atomic(out / f"{name}.md", text)

    def spent(row: dict) -> bool:
        if not budget.spent():
            return False
        row.update(status="skipped", note=f"time budget of {args.budget_s:.0f} s spent")
        return True

    if args.r50_step:
        cfg = StepConfig(width=args.step_width, size=args.step_size or (513 if cuda else 33),
                         batch=args.step_batch or (16 if cuda else 2))
        step_dtype = args.step_dtype or ("bf16" if cuda else "fp32")
        # TF32 follows the step's dtype (on for tf32 only), not --dtype's, which the per-op cases get back after it
        with common.precision(step_dtype):
            for provider in args.step_providers:
                op, shape = cfg.label()
                r = dict.fromkeys(FIELDS)
                r.update(env, op=op, provider=provider, mode="train_step", dtype=step_dtype, shape=shape,
                         batch=cfg.batch)
                if not spent(r):
                    r = step_row(provider, device, step_dtype, cfg, args.quick, env, args.dry_launches)
                step_rows.append(r)
                save()
                print(f"  {r['op']} train_step {provider}: {_fmt(r['triton_specializations'])} specializations "
                      f"({r['specializations_from'] or 'not counted'}), {_fmt(r['triton_launches'])} launches of "
                      f"{_fmt(r['distinct_kernels'])} kernels, first step {_fmt(r['first_call_s'])} s "
                      f"{_status(r)}", flush=True)
    for op in args.ops:
        for mode in args.modes:
            for provider in providers:
                row = dict.fromkeys(FIELDS)
                row.update(env, op=op, provider=provider, mode=mode, dtype=args.dtype)
                if not spent(row):
                    row = run_case(op, provider, mode, device, args.dtype, args.quick, env)
                rows.append(row)
                save()
                print(f"  {op:<22} {mode:<9} {provider:<9} {_fmt(row['host_us'])} µs, {_fmt(row['aten_ops'])} aten "
                      f"ops, {_fmt(row['syncs'])} syncs {_status(row)}", flush=True)
    fill_eager(rows)  # (for the table, printed before the last save, which fills it too)
    print_table(rows + step_rows)
    save(partial=False)
    print(f"wrote {out / (name + '.csv')} and {out / (name + '.md')}")
    common.release_results()
    every = rows + step_rows
    return 0 if all(r["status"] != "error" for r in every) and any(r["status"] == "ok" for r in every) else 1


def _status(row: dict) -> str:
    """A row's status for its progress line, with the reason when it did not run ("skipped: ...")."""
    return row["status"] if row["status"] == "ok" or not row.get("note") else f"{row['status']}: {row['note']}"


def _interpreter() -> bool:
    from deeplab_ops.backends import interpreter_active

    return interpreter_active()


if __name__ == "__main__":
    sys.exit(common.run_script(main, "overhead_bench.py"))

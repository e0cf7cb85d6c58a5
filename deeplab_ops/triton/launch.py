"""Kernel launches: a per-process cache of tuned configurations and the one place every launch goes through.

The first call of a kernel for a key (kernel, device, dtype, constexpr flags, the sizes that decide the tile:
channel counts bucketed to powers of two, strides exact; never the spatial sizes) times the pruned candidate
configurations once and caches the winner; every later call is a direct launch of the JIT kernel with it. Winners
are also kept on disk (`set_tuning_cache`): a later process loads the winner, nothing timed and, with Triton's
kernel cache beside it, only the winner loaded, not every candidate compiled. No
Triton autotuner is involved: a call launches with the configuration this call looked up, never with shared
"last best" state. Every launch runs on its tensors' device (a device guard when that is not the current one) and
is counted for `count_launches`. Interpreted launches (CPU tensors) hold one process-wide lock.

How tuning is done (`set_autotune`, or the environment variable DEEPLAB_OPS_AUTOTUNE at import):
  "gpu" (default)  CUDA launches are tuned with triton.testing.do_bench; the interpreter runs its fixed config;
  "all"            the interpreter tunes too, among the same pruned candidates (the Ampere list), timed by the wall
                   clock on CPU tensors: the tuning path runs where no GPU is (tests);
  "off"            nothing is tuned: CUDA launches use the first pruned candidate, the interpreter its fixed config.
Where winners persist (`set_tuning_cache`, or DEEPLAB_OPS_TUNING_CACHE at import): "" or unset, a folder
deeplab_ops_tuning in Triton's cache folder ($TRITON_CACHE_DIR, else ~/.triton/cache); "off", nowhere; anything
else, that folder. Entries live in a subfolder per Triton version and kernel sources (`kept_folder`), one small
JSON file per tuning key and pixel-count bucket (N x H x W to a power of 4: a winner timed on a small map never
serves a large one), named by a hash of the GPU's name, architecture and SM count, CUDA's version, the key, the
bucket and the candidate list: a change to any of them is a miss, timed again. A winner chosen while memory ran out
during the timing is not kept. Processes may share the folder (each file is written apart, then renamed).
With torch.use_deterministic_algorithms(True) (train.py --deterministic) nothing is timed either, whatever the mode:
the first pruned candidate (cached apart from timed winners). The winner of a timing can differ from one process to
the next, and another tile sums the BatchNorm partials and the GEMMs in another order: results would differ in
their last bits between runs, as cuDNN's do with cudnn.benchmark; a kept winner makes later runs take the same one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import math
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
import triton
import triton.testing
from triton.runtime.errors import OutOfResources

from deeplab_ops.common import TUNING_CACHE_ENV
from deeplab_ops.common import check_autotune_mode as _check_mode
from deeplab_ops.common import env_autotune_mode as _env_autotune_mode
from deeplab_ops.common import interpreter_active as _interpreter_active
from deeplab_ops.common import tuning_cache_folder as _tuning_cache_folder
from deeplab_ops.triton.counting import _COUNTERS, _OPEN, Signature, launch_counters
from deeplab_ops.triton.counting import paused as _counting_paused
from deeplab_ops.triton.counting import record_launch as _record_launch

_AUTOTUNE = [_env_autotune_mode()]


_TUNING_CACHE = [os.environ.get(TUNING_CACHE_ENV, "")]


def set_tuning_cache(folder: str) -> str:
    """Where timed winners persist: a folder, "" for the default (deeplab_ops_tuning in Triton's cache folder) or
    "off"; returns the previous setting. Process-wide; winners already in memory stay."""
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder={folder!r} must be a path, \"\" (the default folder) or \"off\"")
    previous = _TUNING_CACHE[0]
    _TUNING_CACHE[0] = os.fspath(folder)
    return previous


def tuning_cache_dir() -> str | None:
    """The folder timed winners persist in, or None where that is off."""
    return _tuning_cache_folder(_TUNING_CACHE[0])


def set_autotune(mode: str) -> str:
    """Set how kernels are tuned ("gpu", "all" or "off", see the module docstring); returns the previous mode.
    Process-wide: set it before the calls it should govern. Cached configurations stay cached."""
    previous = _AUTOTUNE[0]
    _AUTOTUNE[0] = _check_mode(mode, "mode")
    return previous


def autotune_mode() -> str:
    """The current tuning mode."""
    return _AUTOTUNE[0]


def kernel_name(kernel) -> str:
    """"_conv_fwd_kernel" -> "conv_fwd": the name `count_launches` reports."""
    name = kernel.fn.__name__.lstrip("_")
    return name[: -len("_kernel")] if name.endswith("_kernel") else name


# ---- host arithmetic ---------------------------------------------------------------------------------------
#
# triton.cdiv and triton.next_power_of_2 are ConstexprFunctions in Triton 3.8: about 2 us per host call (argument
# unwrapping through the JIT machinery), and a layer's launches compute a dozen grid sizes. Host code uses these.


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b: triton.cdiv's value, at a plain division's cost."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (0 for 0): triton.next_power_of_2's value, at a bit_length's cost."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


# ---- small constants on the device -------------------------------------------------------------------------


def device_constants(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` as a read-only 1-D tensor on `device` (momentum and eps, a Python float argument being rounded to
    float32; the ASPP's rates), filled by kernels: a host-to-device copy would synchronize the stream, per call with
    momentum=None BatchNorm, whose factor changes every step. Cached per stream, each filled on the stream that reads
    it, so no reader on another stream runs before its fill. Inside a CUDA-graph capture: a fresh tensor the graph
    fills when it replays, never cached (a cached one would stay unfilled for eager calls before a replay)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _filled(values, dtype, device)
    return _cached_constants(values, dtype, device, current_stream_id(device))


def current_stream_id(device: torch.device) -> int:
    """The raw id of `device`'s current stream (0 for a non-CUDA device). Freed memory is reused in its allocating
    stream's order only: cached device memory that kernels read is either keyed by the reading stream
    (`device_constants`) or recorded on a reading stream other than the allocating one (the loss's stencil
    tables), else an entry evicted from a cache while a kernel on another stream still read it could be handed out
    and overwritten under that kernel."""
    if device.type != "cuda":
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()  # torch.device("cuda")
    return torch._C._cuda_getCurrentRawStream(index)


def _filled(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.empty(len(values), dtype=dtype, device=device)
    for i, v in enumerate(values):
        t[i].fill_(v)
    return t


@functools.lru_cache(maxsize=128)
def _cached_constants(values: tuple, dtype: torch.dtype, device: torch.device, stream: int) -> torch.Tensor:
    return _filled(values, dtype, device)


# ---- launches --------------------------------------------------------------------------------------------

INTERPRETER_LOCK = threading.RLock()  # the interpreter keeps its launch grid in process-wide state


def _device_of(args) -> torch.device | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def device_guard(device: torch.device | None):
    """A context that makes `device` current for a launch: torch.cuda.device when `device` is a CUDA device other
    than the current one, else nothing; the interpreter lock for CPU (any non-CUDA) tensors."""
    if device is None:
        return contextlib.nullcontext()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index != torch.cuda.current_device():
            return torch.cuda.device(index)
        return contextlib.nullcontext()
    return INTERPRETER_LOCK


class _CompileOnly(threading.local):
    """.on: this thread's launches compile their kernel and launch nothing (`compile_concurrently`); .kernels: the
    kernels they compiled. A class attribute default: a thread that never set it reads it without an exception."""

    on = False
    kernels: set | None = None


_COMPILE_ONLY = _CompileOnly()


def launch_kernel(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)` on the device of its first tensor argument, counted: every launch of this
    package goes through here."""
    active = getattr(_COUNTERS, "active", None) or (_OPEN and launch_counters())
    if active:
        _record_launch(active, kernel_name(kernel), lambda: launch_signature(kernel, args, kwargs))
    with device_guard(_device_of(args)):
        if _COMPILE_ONLY.on:
            _COMPILE_ONLY.kernels.add(kernel)
            kernel.warmup(*args, grid=grid, **kwargs)
        else:
            kernel[grid](*args, **kwargs)


# ---- what a launch would compile on a GPU ----------------------------------------------------------------

_PARAMS: dict[object, tuple[tuple[str, ...], frozenset[str]]] = {}
_DEFAULT_OPTIONS = {"num_warps": 4, "num_stages": 3}  # Triton's defaults for CUDA
_NOT_SPECIALIZED: dict[object, frozenset[str]] = {}  # kernel -> its do_not_specialize names (`jit_unspecialized`)


def jit_unspecialized(*names: str):
    """`@triton.jit(do_not_specialize=names)`, remembered for `launch_signature` (the interpreter's kernels do not
    keep it): for integers that follow the batch and map size (a count of tiles), one compiled kernel serves every
    value instead of three (== 1, divisible by 16, other)."""
    def wrap(fn):
        kernel = triton.jit(do_not_specialize=list(names))(fn)
        _NOT_SPECIALIZED[kernel] = frozenset(names)
        return kernel
    return wrap


def _params(kernel) -> tuple[tuple[str, ...], frozenset[str]]:
    """(parameter names, constexpr names) of a JIT (or interpreted) kernel."""
    info = _PARAMS.get(kernel)
    if info is None:
        params = inspect.signature(kernel.fn).parameters
        constexpr = frozenset(n for n, p in params.items() if "constexpr" in str(p.annotation))
        info = _PARAMS[kernel] = (tuple(params), constexpr)
    return info


def arg_class(value):
    """Triton's specialization of a runtime argument on CUDA: tensors by dtype and 16-byte alignment, integers by
    width and class (== 1: a constant; divisible by 16; other)."""
    if isinstance(value, torch.Tensor):
        return (f"*{str(value.dtype).removeprefix('torch.')}", "align16" if value.data_ptr() % 16 == 0 else "")
    if isinstance(value, bool):
        return ("u1",)
    if isinstance(value, int):
        width = "i32" if -(2**31) <= value < 2**31 else "i64"
        return (width, "==1" if value == 1 else "div16" if value % 16 == 0 else "")
    if isinstance(value, float):
        return ("fp32",)
    if value is None:
        return ("none",)
    return (type(value).__name__,)


def launch_signature(kernel, args: tuple, kwargs: dict) -> Signature:
    """The JIT specialization a launch of `kernel` with these arguments compiles on a GPU: its name, constexpr and
    compile-option values (num_warps and num_stages default to Triton's 4 and 3), and the class of every runtime
    argument (`arg_class`). Equal signatures share one compiled kernel."""
    names, constexpr = _params(kernel)
    bound = dict(zip(names, args, strict=False))  # the rest by keyword
    bound.update((k, v) for k, v in kwargs.items() if k in names)
    consts = [(n, _hashable(bound[n])) for n in names if n in constexpr and n in bound]
    options = [(k, kwargs.get(k, default)) for k, default in _DEFAULT_OPTIONS.items()]
    plain = _NOT_SPECIALIZED.get(kernel, frozenset())
    classes = tuple((n, arg_class(bound[n])[0], "") if n in plain else (n, *arg_class(bound[n]))
                    for n in names if n not in constexpr and n in bound)
    return Signature(kernel_name(kernel), tuple(consts + options), classes)


# ---- tuning ----------------------------------------------------------------------------------------------


class KernelSpec(NamedTuple):
    """A tunable kernel: its configurations per architecture, the pruner, and the sizes that key the cache."""

    kernel: object
    hopper: list            # triton.Config list for sm_90+
    ampere: list            # triton.Config list for sm_80..89 and older
    interpreter: dict       # the interpreter's (and pair counting's) fixed configuration
    prune: Callable         # prune(configs, sizes) -> configs
    bucketed: tuple[str, ...] = ()   # sizes keyed by their next power of two (channels)
    exact: tuple[str, ...] = ()      # sizes keyed exactly (strides)

    def configs(self, hopper: bool) -> list:
        return self.hopper if hopper else self.ampere


# Sizes that never key the cache, whatever a spec lists: the batch, the spatial extents and the split counts derived
# from them. The tile that wins is decided by dtype, kernel size, stride and channels, and a new map size must not
# re-tune (each candidate compiled again) on a GPU. (The batch and the extents do enter a kept winner's file name, as
# a pixel-count bucket: `_pixel_bucket`.)
UNKEYED = frozenset({"N", "H", "W", "H_out", "W_out", "HW", "SPLITS"})


def config_dict(config) -> dict:
    """A triton.Config as launch keyword arguments."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


TUNED: dict[tuple, dict] = {}  # tuning key -> the configuration its calls launch with (read it; tuned_config writes)
_TUNE_LOCK = threading.Lock()


def _hashable(value):
    return value if isinstance(value, (int, float, str, bool, type(None), torch.dtype)) else repr(value)


def _bucket(v: int) -> int:
    return next_power_of_2(max(int(v), 1))


def _on_gpu(device: torch.device) -> bool:
    return device.type == "cuda" and not _interpreter_active()


def tuning_key(spec: KernelSpec, device: torch.device, dtype: torch.dtype, sizes: dict, meta: dict) -> tuple:
    """The cache key of a call: kernel, device, dtype, constexprs, keyed sizes (`UNKEYED` ones left out)."""
    return (spec.kernel, device.type, device.index, dtype, tuple(sorted((k, _hashable(v)) for k, v in meta.items())),
            tuple(_bucket(sizes[k]) for k in spec.bucketed if k not in UNKEYED),
            tuple(sizes[k] for k in spec.exact if k not in UNKEYED))


def candidates(spec: KernelSpec, device: torch.device, sizes: dict) -> list[dict]:
    """The configurations a call is tuned among: the device's list (Hopper on sm_90+, else Ampere; the Ampere list
    for the interpreter), pruned for `sizes`; as launch keyword arguments."""
    hopper = _on_gpu(device) and torch.cuda.get_device_capability(device)[0] >= 9
    return [config_dict(c) for c in spec.prune(spec.configs(hopper), sizes)]


def tuned_config(spec: KernelSpec, device: torch.device, dtype: torch.dtype, sizes: dict, meta: dict,
                 run: Callable[[dict], object]) -> dict:
    """The configuration to launch `spec` with. `run(config)` launches the kernel (used only when tuning)."""
    mode = _AUTOTUNE[0]
    gpu = _on_gpu(device)
    if not gpu and mode != "all":
        return spec.interpreter
    key = tuning_key(spec, device, dtype, sizes, meta)
    deterministic = torch.are_deterministic_algorithms_enabled()
    if deterministic:
        key = (*key, "deterministic")  # never a timed winner
    config = TUNED.get(key)
    if config is not None:
        return config
    untimed = deterministic or (gpu and mode == "off")
    if gpu and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        # Inside a CUDA-graph capture nothing may be timed (do_bench synchronizes): a kept winner (a file read, host
        # only), else the first candidate, not remembered, so that a call outside the capture still tunes this key.
        kept = None if untimed else _kept(spec, key, device, sizes)
        if kept is None or kept[1] is None:
            return candidates(spec, device, sizes)[0]
        with _TUNE_LOCK:
            return TUNED.setdefault(key, kept[1])
    warning = None
    with _TUNE_LOCK:
        config = TUNED.get(key)
        if config is None:
            if untimed:
                config = candidates(spec, device, sizes)[0]
            else:
                config, warning = _timed_or_kept(spec, key, device, sizes, run)
            TUNED[key] = config
    if warning is not None:  # after the winner is remembered: an error-raising warning filter loses nothing
        warnings.warn(warning, stacklevel=2)
    return config


# ---- winners on disk ---------------------------------------------------------------------------------------


class _Tuned(dict):
    """`tune`'s choice, with the candidates' times (`timings`: (ms, configuration) in candidate order; a candidate
    that did not fit is missing), which its kept entry records: what a shorter candidate list would be chosen from.
    `complete` is False where memory ran out while timing: used, never kept on disk."""

    def __init__(self, config: dict, timings: list, complete: bool = True):
        super().__init__(config)
        self.timings, self.complete = timings, complete


@functools.cache
def _sources_digest() -> str | None:
    """A hash of this package's Triton sources (None where they cannot be read: nothing is kept then)."""
    digest = hashlib.sha256()
    folder = os.path.dirname(os.path.abspath(__file__))
    try:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    digest.update(name.encode() + b"\0" + f.read())
    except OSError:
        return None
    return digest.hexdigest()


def kept_folder() -> str | None:
    """The subfolder of the tuning folder that this Triton and these kernel sources read and write (an edit to any
    kernel or helper, or another Triton, starts an empty one), or None where winners are not kept."""
    base = tuning_cache_dir()
    digest = _sources_digest() if base is not None else None
    return None if digest is None else os.path.join(base, f"triton-{triton.__version__}-{digest[:16]}")


def _device_identity(device: torch.device) -> str:
    if not _on_gpu(device):
        return "interpreter"
    props = torch.cuda.get_device_properties(device)
    return f"{props.name} sm_{props.major}{props.minor} {props.multi_processor_count} SMs cuda {torch.version.cuda}"


_PIXEL_SIZES = (("H_out", "W_out"), ("H", "W"), ("HW",))


def _pixel_bucket(sizes: dict) -> int:
    """The call's pixel count (N x its map's pixels) rounded up to a power of 4. The in-process key leaves the map
    size out (a new size must not time again); a kept winner is keyed by this too, so that a winner timed on a
    small map (a benchmark, a test image) never serves a later run's large one."""
    for names in _PIXEL_SIZES:
        if all(n in sizes for n in names):
            pixels = sizes.get("N", 1) * math.prod(sizes[n] for n in names)
            bucket = 1
            while bucket < pixels:
                bucket *= 4
            return bucket
    return 0


def _kept(spec: KernelSpec, key: tuple, device: torch.device, sizes: dict) -> tuple | None:
    """(file and key text, the kept winner or None) of a tuning key with candidates to time; None where winners are
    not kept or there is one candidate."""
    folder = kept_folder()
    if folder is None:
        return None
    configs = candidates(spec, device, sizes)
    if len(configs) == 1:
        return None
    text = repr((_device_identity(device), kernel_name(spec.kernel), key[3:], _pixel_bucket(sizes), configs))
    entry = os.path.join(folder, hashlib.sha256(text.encode()).hexdigest()[:40] + ".json"), text
    return entry, _load_winner(entry, configs)


def _load_winner(entry: tuple[str, str], configs: list[dict]) -> dict | None:
    """The kept winner, if the file is there, is this key's and names one of the candidates."""
    path, text = entry
    try:
        with open(path, encoding="utf-8") as f:
            kept = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(kept, dict) or kept.get("key") != text:
        return None
    return next((c for c in configs if c == kept.get("config")), None)


_WRITE_WARNED: set[str] = set()


def _keep_winner(entry: tuple[str, str], config: dict) -> str | None:
    """Write the winner to a file of its own, then rename it into place (readers in other processes, on other hosts
    sharing the folder too, never see half a file). Where the folder cannot be written: nothing kept, and the
    first time, a warning's text (the caller warns)."""
    path, text = entry
    folder = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
        timings = [{"config": c, "ms": ms} for ms, c in getattr(config, "timings", ())]
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"key": text, "config": config, "timings": timings}, f)
        os.replace(tmp, path)
        return None
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        if folder in _WRITE_WARNED:
            return None
        _WRITE_WARNED.add(folder)
        return (f"deeplab_ops: tuned configurations cannot be kept in {folder!r} ({e}); the next process times them "
                f"again (set {TUNING_CACHE_ENV} to another folder, or to off)")


def _timed_or_kept(spec: KernelSpec, key: tuple, device: torch.device, sizes: dict,
                   run: Callable[[dict], object]) -> tuple[dict, str | None]:
    """(a kept winner of this key, else `tune`'s, kept when every candidate was timed; a warning's text or None)."""
    kept = _kept(spec, key, device, sizes)
    if kept is None:
        return tune(spec, device, sizes, run), None
    entry, winner = kept
    if winner is not None:
        return winner, None
    config = tune(spec, device, sizes, run)
    return config, _keep_winner(entry, config) if getattr(config, "complete", True) else None


def tune(spec: KernelSpec, device: torch.device, sizes: dict, run: Callable[[dict], object]) -> dict:
    """The fastest of the candidates. Where memory runs out while timing them (do_bench's cache-flush buffer of
    256 MB, or a candidate's run, on a GPU near full), the fastest timed so far, else the first: the call must not
    fail for a timing it does not need, and the choice is kept (timing again at every call would fail again, each
    failed allocation emptying the allocator's cache)."""
    configs = candidates(spec, device, sizes)
    if len(configs) == 1:
        return configs[0]
    timings = []
    with _counting_paused(), device_guard(device):  # benchmark runs are not counted as launches of the caller
        if _on_gpu(device):
            compile_concurrently(run, configs)
        for config in configs:
            try:
                timings.append((_time(run, config, device), config))
            except OutOfResources:
                continue
            except torch.OutOfMemoryError:
                best = min(timings, key=lambda t: t[0])[1] if timings else configs[0]
                return _Tuned(best, timings, complete=False)
    if not timings:
        raise RuntimeError(f"no configuration of {kernel_name(spec.kernel)} fits this GPU: {configs}")
    return _Tuned(min(timings, key=lambda t: t[0])[1], timings)


def _async_compile_mode():
    """Triton's AsyncCompileMode (JIT compiles submitted to an executor) where it takes ignore_errors (triton >= 3.6;
    3.5's raises the first failed compile when its block ends), or None."""
    try:
        from triton.runtime import _async_compile
    except ImportError:
        return None
    mode = getattr(_async_compile, "AsyncCompileMode", None)
    active = getattr(_async_compile, "active_mode", None)
    if mode is None or active is None or active.get() is not None:  # another caller's compile batch is open
        return None
    try:
        if "ignore_errors" not in inspect.signature(mode).parameters:
            return None
    except (TypeError, ValueError):
        return None
    return mode


def _drop_failed_compiles(kernels) -> None:
    """Remove from these kernels' JIT caches the compiles that failed in the pool: Triton 3.8 keeps a failed
    compile's future there, and every later launch of that variant would raise its stored error, never compiling
    again (3.6 keeps nothing and compiles again at the launch)."""
    for kernel in kernels:
        for entry in list(getattr(kernel, "device_caches", {}).values()):
            cache = entry[0]
            for key, value in list(cache.items()):
                future = getattr(value, "future", None)
                if future is not None and future.done() and future.exception() is not None:
                    cache.pop(key, None)


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def compile_concurrently(run: Callable[[dict], object], configs: list[dict]) -> None:
    """Compile every candidate configuration of a new tuning key at once, on a thread pool (Triton's compile
    releases the interpreter lock in its passes and ptxas: 4 configurations of the conv forward compiled for sm_90
    in 2.4 s instead of 4.3 on 2 idle cores, triton 3.8; 1.9 instead of 3.1 with 3.6), before `tune` times them one by
    one: a first call of a new key pays about one compile instead of one per candidate. `run(config)` goes through
    `launch_kernel`, which under this thread's compile-only flag compiles (JITFunction.warmup) and launches
    nothing. A candidate whose compile fails here fails again when timed, where `tune` handles it as before.
    Sequential (nothing done here) on a Triton before 3.6, or with one machine core."""
    mode = _async_compile_mode()
    workers = min(len(configs), _cores(), 8)
    if mode is None or workers < 2:
        return
    previous = _COMPILE_ONLY.on, _COMPILE_ONLY.kernels
    _COMPILE_ONLY.on, _COMPILE_ONLY.kernels = True, set()
    compiled = _COMPILE_ONLY.kernels
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="deeplab_ops-compile") as pool, \
                mode(pool, ignore_errors=True):
            for config in configs:
                try:
                    run(config)
                except Exception:  # noqa: BLE001  (raised again, and handled, when this candidate is timed)
                    continue
    finally:
        _COMPILE_ONLY.on, _COMPILE_ONLY.kernels = previous
        _drop_failed_compiles(compiled)


def _time(run: Callable[[dict], object], config: dict, device: torch.device) -> float:
    if _on_gpu(device):
        return triton.testing.do_bench(lambda: run(config), warmup=5, rep=20)
    start = time.perf_counter()  # the interpreter: one run, wall clock
    run(config)
    return time.perf_counter() - start


def prune_by_channels(n_arg: str, k_arg: str, n_block: str, k_block: str) -> Callable:
    """Channel blocks wider than the channels waste the MMA: keep the configurations that fit. Blocks narrower
    than 32 channels (every list's smallest tile, 16 x 16: float64's, and for channel counts <= 16) are kept only
    where the channels they run along number 16 or fewer: elsewhere the list's next tile (32 or 64 channels wide,
    and more pixels) does the same work in a fraction of the programs, with wgmma on sm_90 where the 16-wide one
    lowers to mma.sync, and the narrow one costs a compile and a timing per new tuning key (unmeasured on a GPU: a
    judgment). The smallest configuration if none is kept."""

    def prune(configs, sizes):
        n_cap = max(16, next_power_of_2(sizes[n_arg]))
        k_cap = max(16, next_power_of_2(sizes[k_arg]))
        kept = [c for c in configs if _fits(c.kwargs[n_block], n_cap) and _fits(c.kwargs[k_block], k_cap)]
        return kept or [min(configs, key=lambda c: c.kwargs[n_block] * c.kwargs[k_block])]

    return prune


def _fits(block: int, cap: int) -> bool:
    return block <= cap and (block >= 32 or cap <= 16)


def run_tuned(spec: KernelSpec, device: torch.device, dtype: torch.dtype, sizes: dict, meta: dict,
              run: Callable[[dict], object], config: dict | None = None):
    """`run(config)` with `config`, or the cached/tuned configuration: what the launchers call. On the device of
    the tensors (CPU tensors: under the interpreter lock, so that tuning and launch are not interleaved)."""
    with device_guard(device):
        return run(config if config is not None else tuned_config(spec, device, dtype, sizes, meta, run))

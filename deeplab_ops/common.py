"""The bottom layer: shape, dtype and layout helpers and the parameter-derived cache, imported by ops/, triton/
and nn (this module imports none of them).
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
import os
import re
import threading
import weakref

import torch
from torch._prims_common import suggest_memory_format
from torch.optim.optimizer import register_optimizer_step_post_hook

Tensor = torch.Tensor
_CL = torch.channels_last

INT32_MAX = 2**31 - 1
HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def autocast_dtype(x) -> torch.dtype | None:
    """The dtype torch.autocast runs a convolution of x in, where autocast is on for x's device (cpu or cuda) and
    would cast x (a float32, float16 or bfloat16 tensor); None otherwise. The fused ops' front doors cast their
    convolution inputs to it, as eager autocast casts conv2d's; BatchNorm's tensors stay as they are."""
    if not isinstance(x, Tensor):
        return None
    device = x.device.type
    if device not in ("cpu", "cuda") or x.dtype not in (torch.float32, *HALF_DTYPES):
        return None
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def autocast_cast(t, dtype: torch.dtype):
    """t in `dtype` where t is a float32/float16/bfloat16 tensor (autocast's rule); t itself otherwise (None, a
    float64 tensor, a list: each element)."""
    if isinstance(t, (list, tuple)):
        return [autocast_cast(v, dtype) for v in t]
    if isinstance(t, Tensor) and t.dtype in (torch.float32, *HALF_DTYPES) and t.dtype != dtype:
        return t.to(dtype)
    return t


def interpreter_active() -> bool:
    """Whether Triton kernels run in the interpreter (TRITON_INTERPRET=1), on CPU tensors: Triton's own reading of
    the variable ("1" on, "0" or unset off; triton >= 3.4 also reads true/yes/on/y as on and any other value, e.g.
    "off" or "2", as off; older ones only "1")."""
    value = os.environ.get("TRITON_INTERPRET", "")
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    try:  # a rarer spelling: asked of the Triton that will read it
        import triton
    except ImportError:
        return False
    knobs = getattr(triton, "knobs", None)
    return bool(knobs.runtime.interpret) if knobs is not None else False


# Triton releases whose interpreter was checked to run float16 kernels right (against float64, every op and pass of
# this package): NumPy has float16. bfloat16 it stores as raw bits in every release (NumPy has no bfloat16): garbage.
INTERPRETER_FLOAT16_FROM = (3, 6)


def interpreter_dtype_refusal(dtype: torch.dtype) -> str:
    """Why the Triton interpreter cannot run this package's kernels on CPU tensors of `dtype` ('' when it can):
    bfloat16 never (stored as raw bits: a kernel computes garbage), float16 from Triton 3.6 (3.6.0 and 3.8.0 were
    checked; older interpreters were not)."""
    if dtype == torch.bfloat16:
        return ("the Triton interpreter stores bfloat16 as raw bits (NumPy has no bfloat16), so bfloat16 runs on CUDA "
                "tensors only")
    if dtype == torch.float16 and _triton_version() < INTERPRETER_FLOAT16_FROM:
        return (f"the Triton interpreter runs float16 from Triton {'.'.join(map(str, INTERPRETER_FLOAT16_FROM))} "
                f"(this is {'.'.join(map(str, _triton_version()))}), so float16 runs on CUDA tensors only here")
    return ""


@functools.lru_cache(maxsize=1)
def _triton_version() -> tuple[int, int]:
    try:
        import triton
    except ImportError:
        return (0, 0)
    parts = re.findall(r"\d+", triton.__version__)[:2]
    return tuple(int(p) for p in parts) if len(parts) == 2 else (0, 0)


AUTOTUNE_MODES = ("gpu", "all", "off")
AUTOTUNE_ENV = "DEEPLAB_OPS_AUTOTUNE"


def check_autotune_mode(mode, what: str) -> str:
    """`mode` if it is an autotune mode (deeplab_ops.triton.launch), else a ValueError naming `what`."""
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"{what}={mode!r} is not an autotune mode; expected one of {AUTOTUNE_MODES}")
    return mode


def env_autotune_mode() -> str:
    """The triton backend's tuning mode set by $DEEPLAB_OPS_AUTOTUNE ("gpu" when unset or empty); a ValueError naming
    the variable for any other value (read when the triton backend is first imported)."""
    return check_autotune_mode(os.environ.get(AUTOTUNE_ENV) or "gpu", AUTOTUNE_ENV)


TUNING_CACHE_ENV = "DEEPLAB_OPS_TUNING_CACHE"
TUNING_FOLDER = "deeplab_ops_tuning"  # the default folder's name, inside Triton's cache folder


def triton_cache_dir() -> str:
    """The folder Triton keeps compiled kernels in: $TRITON_CACHE_DIR, else ~/.triton/cache (as Triton reads it)."""
    try:
        from triton import knobs  # triton >= 3.4

        return str(knobs.cache.dir)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")


def tuning_cache_folder(setting: str) -> str | None:
    """Where the triton backend keeps tuned winners for a setting of $DEEPLAB_OPS_TUNING_CACHE: "" (unset), a
    folder TUNING_FOLDER in Triton's cache folder; "off", None; else that folder."""
    if setting == "off":
        return None
    return setting or os.path.join(triton_cache_dir(), TUNING_FOLDER)


def bn_momentum_ok(momentum) -> bool:
    """A BatchNorm momentum the fused ops take: a real number in [0, 1] other than a bool (a NumPy float too; PyTorch's
    BatchNorm computes with any number, momentum=1.5 included). Comparisons only: a NaN fails them, and
    torch.compile(dynamic=True) traces a module's numbers as symbolic floats. The float test first: the fused
    forwards ask per call, and a float needs no isinstance."""
    return ((type(momentum) is float or (isinstance(momentum, numbers.Real) and not isinstance(momentum, bool)))
            and 0.0 <= momentum <= 1.0)


def bn_eps_ok(eps) -> bool:
    """A BatchNorm eps the fused ops take: a finite real number > 0 other than a bool (as bn_momentum_ok)."""
    return (type(eps) is float or (isinstance(eps, numbers.Real) and not isinstance(eps, bool))) and 0 < eps < math.inf


def check_bn_numbers(momentum, eps) -> None:
    """The functional ops' error for a momentum or eps they do not take (bn_momentum_ok, bn_eps_ok)."""
    if not bn_momentum_ok(momentum):
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    if not bn_eps_ok(eps):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-channel statistics and accumulators for activations of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pair(value, name: str) -> tuple[int, int]:
    """An int or a pair of ints as a pair; TypeError naming `name` otherwise."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value), int(value)
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
    ):
        return int(value[0]), int(value[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def check_x_channels(x, weight, owner: str) -> None:
    """ValueError naming x when the 4-D tensor x has not the channel count the 4-D conv weight takes."""
    if (isinstance(x, Tensor) and isinstance(weight, Tensor) and x.dim() == 4 and weight.dim() == 4
            and x.shape[1] != weight.shape[1]):
        c = weight.shape[1]
        raise ValueError(f"x has {x.shape[1]} channels (shape {tuple(x.shape)}) but {owner} takes {c} input "
                         f"channels (in_channels); expected x of shape (N, {c}, H, W)")


def conv_layout(x, weight):
    """x laid out as torch's convolution lays out its output, so that a fused op's output (in x's layout) is laid
    out as eager's: channels_last where x or the weight suggests it, as torch's oneDNN and cuDNN convolutions
    decide (cuDNN not for float64). A model converted with .to(memory_format=torch.channels_last) and given an NCHW
    input then computes channels_last from its first convolution on, as eager does, and a dropout after it draws its
    mask in the same order. One conversion of x, only for an NCHW x and a channels_last weight (the first of a
    converted model's layers); anything but two 4-D tensors is left to the argument checks. Not under torch.func's
    vmap (which cannot say) nor torch.jit.trace (whose sizes are traced tensors): x as given there. (C calls only on
    the common paths: an x already channels_last, a weight whose strides fail torch's channels_last rule at its
    second dimension, as every NCHW weight of more than one input channel does, 1 x 1 included.)"""
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor) or x.dim() != 4 or weight.dim() != 4:
        return x
    try:
        if x.is_contiguous(memory_format=_CL) and not x.is_contiguous():  # channels_last already
            return x
        c_in = weight.shape[1]
        if c_in > 1 and weight.stride(3) < weight.stride(1) * c_in:  # an NCHW weight
            return x
    except RuntimeError:  # inside torch.func.vmap, which does not say whether a tensor is channels_last
        return x
    if ((not torch.compiler.is_compiling() and jit_tracing() is not None)
            or suggest_memory_format(weight) != _CL or suggest_memory_format(x) == _CL
            or (x.dtype == torch.float64 and x.is_cuda)):
        return x
    return x.contiguous(memory_format=_CL)


def conv_output_size(
    size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """Spatial output size of a convolution (may be < 1 for invalid geometry)."""
    return (
        (size[0] + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1,
        (size[1] + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1,
    )


def empty_activation(like: Tensor, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None,
                     memory_format: torch.memory_format | None = None) -> Tensor:
    """An empty 4-D activation in `like`'s memory format, or in `memory_format` (what the kernels return for
    outputs)."""
    return torch.empty(
        shape if shape is not None else like.shape,
        dtype=dtype or like.dtype,
        device=like.device,
        memory_format=memory_format or suggest_memory_format(like),
    )


def to_nhwc(t: Tensor) -> Tensor:
    """(N, C, H, W) -> contiguous (N, H, W, C): a view for channels_last tensors, one copy for NCHW ones."""
    return t.permute(0, 2, 3, 1).contiguous()


def from_nhwc(t: Tensor, memory_format: torch.memory_format) -> Tensor:
    """(N, H, W, C) -> (N, C, H, W) in `memory_format`: a view for channels_last, one copy for NCHW."""
    return t.permute(0, 3, 1, 2).contiguous(memory_format=memory_format)


_DTYPE = operator.attrgetter("dtype")


def strided_like(grad: Tensor | None, param: Tensor) -> Tensor | None:
    """`grad` with `param`'s strides where the two differ only in dimensions of size 1 (a 1 x 1 weight created
    channels_last has strides (C_in, 1, C_in, C_in), the same memory as the contiguous (C_in, 1, 1, 1)): a view, no
    copy, so DistributedDataParallel's buckets see the parameter's layout (it warns "grad strides do not match
    bucket view strides" otherwise). Any other grad is returned as it is. The C++ composites' twin:
    strided_like_param (csrc/common/activation_layout.h)."""
    if grad is None or grad.shape != param.shape or grad.stride() == param.stride():
        return grad
    if any(size != 1 and a != b for size, a, b in zip(grad.shape, grad.stride(), param.stride(), strict=True)):
        return grad
    return grad.as_strided(param.shape, param.stride(), grad.storage_offset())


def refuse_layout(name: str, t: Tensor) -> None:
    """Raise for a tensor argument that is not dense (sparse, mkldnn): every op reads its tensors by their strides.
    Called only once a caller's inline `t.layout != torch.strided` found one (no frame per call)."""
    raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def refuse_running_grad(name: str) -> None:
    """Raise for running statistics that require grad while grad mode is on: F.batch_norm refuses them (buffers it
    updates in place, not differentiable inputs); the kernels would update them behind autograd's back."""
    raise ValueError(f"{name} requires grad, but running statistics are buffers that BatchNorm updates in place and "
                     f"does not differentiate (F.batch_norm refuses them too); pass {name}.detach(), or call under "
                     "torch.no_grad()")


def check_running_writable(named, read=()) -> None:
    """Raise for running statistics that a training call cannot update in place: one whose elements share memory
    (an expanded view: stride 0 over more than one value), two that share memory with each other, or one that
    shares memory with a tensor the call reads (`read`: the BatchNorm weight and bias; eager's F.batch_norm would
    read them after its own update of the running statistics, the fused kernels before). `named`, `read`:
    (name, value) pairs, a value one tensor or a list of them (named name[i]); the read tensors may share memory
    with each other. Strides and addresses only (no aten op, one Python frame per call); an exact element test
    only where two tensors' address ranges interleave. A list that carries its tensors' joined view as `whole`
    (ops.aspp.Packed: back to back in one storage) is taken as that view first."""
    compiling = torch.compiler.is_compiling() or fake_mode() is not None  # (fake tensors: strides, no addresses)
    if not compiling:
        # The usual call, decided cheaply: every value a non-empty 1-D unit-stride vector (a packed list: its joined
        # view) and no range overlapping a written one. Anything else, or an overlap, goes to the general test below,
        # which raises with the names.
        spans, plain = [], True
        for written, pairs in ((True, named), (False, read)):
            for _, value in pairs:
                if value is None:
                    continue
                t = value if isinstance(value, Tensor) else getattr(value, "whole", None)
                if t is None or t.stride() != (1,) or not t.numel() or t.is_meta:
                    plain = False
                    break
                try:
                    start = t.data_ptr()
                except RuntimeError:  # (no storage: a fake tensor, torch.func's wrappers)
                    plain = False
                    break
                spans.append((start, start + t.nbytes, written))
            if not plain:
                break
        if plain:
            for i, (start, end, written) in enumerate(spans):
                if written:
                    for j, (other_start, other_end, _) in enumerate(spans):
                        if j != i and start < other_end and other_start < end:
                            plain = False
            if plain:
                return
    _check_spans(named, read, compiling)


def _check_spans(named, read, compiling: bool) -> None:
    """check_running_writable's general test: any layout, names in the errors."""
    spans = []
    for written, pairs in ((True, named), (False, read)):  # (plain loops: no frame per call on the per-call path)
        for group, value in pairs:
            if value is None:
                continue
            single = isinstance(value, Tensor)
            index = -1
            for t in (value,) if single else value:
                index += 1  # (a list's tensors are named group[i], on error only)
                strides = t.stride()
                if len(strides) == 1:  # (the usual (C,) vector: no loop)
                    size = t.shape[0]
                    extent = 1 + (size - 1) * strides[0]
                    expanded = size > 1 and strides[0] == 0
                else:
                    extent, expanded = 1, False
                    for size, stride in zip(t.shape, strides, strict=True):
                        extent += (size - 1) * stride
                        expanded = expanded or (size > 1 and stride == 0)
                if expanded and written:
                    name = _label(group, None if single else index)
                    size = next(n for n, st in zip(t.shape, strides, strict=True) if n > 1 and st == 0)
                    raise ValueError(
                        f"{name} has overlapping memory (stride 0 over {size} values: an expanded view, shape "
                        f"{tuple(t.shape)}, strides {strides}), but training BatchNorm updates it in place, one "
                        f"value per channel; pass a tensor with its own memory, e.g. {name}.clone()")
                if compiling or t.is_meta or not t.numel():
                    continue  # (no addresses there)
                try:
                    start = t.data_ptr()
                except RuntimeError:  # a tensor without storage (a fake one, torch.func's wrappers): nothing to compare
                    continue
                spans.append((start, start + extent * t.element_size(), group, None if single else index, t, written))
    spans.sort(key=operator.itemgetter(0))
    # Each range against every earlier one still open at its start, not only its neighbour: a third interleaved
    # range can share elements with the first while the second, between them, shares none with either.
    reach = 0  # the highest end among the ranges before: below it a range may interleave with any of them
    for j, (start, end, other_group, other_index, u, u_written) in enumerate(spans):
        if start < reach:  # (plain loops: no frame per call on the per-call path)
            for _, earlier_end, group, index, t, t_written in spans[:j]:
                if ((u_written or t_written) and start < earlier_end
                        and bool(torch.isin(_addresses(u), _addresses(t)).any())):
                    first, other = _label(group, index), _label(other_group, other_index)
                    if u_written and t_written:
                        why, clone = "updates both in place (one would overwrite the other's new values)", other
                    else:  # the tensor read is the one to copy: a copy of a running statistic would miss its update
                        written, clone = (first, other) if t_written else (other, first)
                        why = (f"updates {written} in place while it reads {clone} (eager BatchNorm would read the "
                               f"updated values)")
                    raise ValueError(
                        f"{first} and {other} share memory, but training BatchNorm {why}; pass tensors with their "
                        f"own memory, e.g. {clone}.clone()")
        reach = max(reach, end)


def _label(group: str, index: int | None) -> str:
    return group if index is None else f"{group}[{index}]"


def _addresses(t: Tensor) -> Tensor:
    """The byte addresses of t's elements (a CPU int64 tensor): the exact test behind check_running_writable."""
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride(), strict=True):
        offsets = offsets.unsqueeze(-1) + torch.arange(size) * stride
    return offsets.flatten() * t.element_size() + t.data_ptr()


def drop_oldest(cache: dict) -> None:
    """Remove the first-inserted entry of `cache` (a bounded cache's eviction); nothing where another thread changed
    it meanwhile (then it is no larger than the bound either)."""
    try:
        del cache[next(iter(cache))]
    except (KeyError, RuntimeError, StopIteration):
        pass


is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
# fake_mode(): the active FakeTensorMode, else None (a C-level call: no Python frame on the per-call paths). Under one
# outside torch.compile (shape propagation, memory estimation), tensors made there have no addresses (data_ptr()
# reads 0) and no values, and a module's real tensors read there come back as fake ones, which nothing may keep (a
# cache entry, a packed storage) for the real calls after it.
fake_mode = functools.partial(torch._C._get_dispatch_mode, torch._C._TorchDispatchModeKey.FAKE)
functorch_transform = torch._C._functorch.peek_interpreter_stack  # None outside every torch.func transform
# None outside torch.jit.trace (torch.jit.is_tracing() without its Python frame): a traced graph must compute what it
# depends on from the module's tensors (a cached value would be recorded as a constant) and serve every grad mode.
jit_tracing = torch._C._get_tracing_state


def graph_for_every_grad_mode() -> bool:
    """Whether a graph is being recorded that will also run where the op builds no autograd node (under no_grad, or
    with nothing requiring grad): torch.jit.trace, torch.export. The running statistics' update, which an op that
    builds a node writes from its Autograd kernel (not part of the recorded graph), must then be recorded as copies."""
    return jit_tracing() is not None or torch.compiler.is_exporting()


def back_to_back(ts) -> bool:
    """Whether the equally shaped tensors `ts` (a non-empty sequence) lie back to back, in order, in the first one's
    storage, with one dtype and each contiguous: what lets a list of per-BatchNorm tensors be taken as one view. The
    per-tensor tests are list comparisons and C-level maps (the fused ASPP asks every call). A torch.func
    transform's tensors (vmap over stacked module states) have no storage: never back to back."""
    first = ts[0]
    if is_functorch_wrapped(first):
        return False
    n, size, base = first.numel(), first.element_size(), first.data_ptr()
    step = n * size
    return (step > 0 and [t.data_ptr() for t in ts] == list(range(base, base + step * len(ts), step))
            and first.untyped_storage().nbytes() >= (first.storage_offset() + n * len(ts)) * size
            and all(map(first.dtype.__eq__, map(_DTYPE, ts))) and all(map(Tensor.is_contiguous, ts)))


# ---- tensors derived from parameters, cached per parameter version --------------------------------------------
#
# A packed/transposed weight or a BatchNorm folded into a conv is a pure function of a few parameters and buffers.
# It is rebuilt only when one of them changed: an entry is keyed by the kind of derivative and the identity of its
# source tensors, and valid while each source keeps its storage (data_ptr), its version counter, its shape (so a
# derivative never reaches a kernel with a shape its checks did not see) and its strides (a `.data` assignment of
# another view of the same storage, a transpose, keeps the other three). Every in-place
# write bumps the counter (optimizer steps, load_state_dict's copy_, running-statistics updates), and so does every
# in-place change of a tensor's metadata (resize_, set_, t_, as_strided_, unsqueeze_); a new storage changes data_ptr.
# The cache holds no reference to a source tensor, strong or weak, and only a weak one to its storage: a weakref
# finalizer on each source's storage (PyTorch keeps one Python object per storage while the storage lives) drops the
# entry when the storage is freed, so no address is reused while an entry holds it. None on the tensor: swap_tensors
# refuses a tensor that has a weak reference, and PyTorch's swap-on-conversion mode swaps every parameter a
# conversion or load reaches, a child module's too. A tensor freed while its storage lives (a view of it kept: a
# state_dict() of a deleted model, tensors loaded with assign=True from a state dict still held) leaves its entry
# until the storage goes, or until the cache's bounds push it out (oldest stored first, beyond _DERIVED_MAX_ENTRIES
# entries or _DERIVED_MAX_BYTES of values). An entry is keyed by the tensors' ids and valid only for the same
# storage, data pointer, version, shape and strides: the same bytes whatever object now has the id, unless that
# object is one made through `.data` (a version counter of its own, which a write through another view does not
# move: the `.data` rule below). A derivative that is a view of a source is returned uncached: it would keep the
# storage whose death evicts it.
# Not cached (built every call): under torch.compile and CUDA-graph capture (the derivation must be part of the
# graph, or a replay after an optimizer step would read a stale value), inference-mode tensors (no version
# counter), and float64 ones: writes through `.data` do not bump the version (torch.autograd.gradcheck perturbs
# inputs that way), and float64 is what gradcheck and numerical validation run in. Code that writes float32/half
# parameters through `.data` (or through a tensor they were made views of by a `.data` assignment, as
# torch.nn.utils.vector_to_parameters does) must call `clear_derived()` afterwards.
#
# A hit costs three attribute reads and a stride() call per source and one dict lookup (~2 us for five sources): it
# runs on every eval call of every fused layer.

# key -> (the sources' state, the value, the finalizers that evict the entry when a source's storage is freed (one
# per storage, registered when the entry is stored and detached when it goes, so rebuilding after clear_derived()
# adds none), the value's bytes), oldest stored first
_DERIVED: dict[tuple, tuple[tuple, object, tuple, int]] = {}
_DERIVED_MAX_ENTRIES = 4096
_DERIVED_MAX_BYTES = 1 << 30  # (as the cpu backend's Winograd transforms, csrc/cpu/winograd_cpu.cpp)
_DERIVED_BYTES = [0]  # the values' bytes, under _DERIVED_LOCK
# Reentrant: the cyclic garbage collector may run at any allocation, inside the lock too, and free a source whose
# finalizer evicts (a parameter held in a reference cycle is freed only so). An eviction reentering there pops
# another entry (the sources of the entry being stored are alive), which the locked code does not hold.
_DERIVED_LOCK = threading.RLock()
_DERIVED_STATS = {"hits": 0, "misses": 0}


def _evict(key: tuple) -> None:
    with _DERIVED_LOCK:
        entry = _pop(key)
    _release(entry)


def _pop(key: tuple):
    """Remove an entry (_DERIVED_LOCK held), its bytes counted out; the entry, or None."""
    entry = _DERIVED.pop(key, None)
    if entry is not None:
        _DERIVED_BYTES[0] -= entry[3]
    return entry


def _release(entry) -> None:
    """Detach a dropped entry's finalizers; its value is freed here, outside the lock (a derived tensor may itself
    be the source of another entry, whose finalizer evicts)."""
    if entry is not None:
        for finalizer in entry[2]:
            finalizer.detach()


def _uncacheable_now(first) -> bool:
    """Whether the derivation must be part of what is being recorded: a torch.compile trace, or a CUDA graph being
    captured on `first`'s device (`first`: the derivative's first source, always a tensor); or is a fake tensor (a
    FakeTensorMode outside torch.compile), which no later real call may be given."""
    return (torch.compiler.is_compiling() or (first.is_cuda and torch.cuda.is_current_stream_capturing())
            or fake_mode() is not None)


def cached_derived(tag, sources):
    """What `derived(tag, sources, ...)` cached for these sources in their current state, or None (never builds):
    the eval fast path's lookup."""
    entry = _DERIVED.get((tag, *map(id, sources)))
    if entry is None or _uncacheable_now(sources[0]):
        return None
    try:
        if entry[0] != tuple([None if t is None else (t.data_ptr(), t._version, t.shape, t.stride())
                              for t in sources]):
            return None
    except (AttributeError, RuntimeError):  # not tensors, or inference tensors: nothing of theirs is cached
        return None
    _DERIVED_STATS["hits"] += 1
    return entry[1]


def derived(tag, sources, build, on_store=None):
    """`build()`, or what it returned for these `sources` (tensors, or None) in their current state. `tag` names the
    kind of derivative and any non-tensor input it depends on. A value that is kept is built outside inference mode
    and without a graph (a plain tensor, whatever mode the first call ran in), and `on_store(value)` is called."""
    if _uncacheable_now(sources[0]):
        return build()
    key = (tag, *map(id, sources))
    entry = _DERIVED.get(key)
    try:  # each source's (storage, version counter, shape, strides: a `.data` assignment may keep all but one)
        state = tuple([None if t is None else (t.data_ptr(), t._version, t.shape, t.stride()) for t in sources])
    except RuntimeError:  # an inference tensor: no version counter
        return build()
    if entry is not None and entry[0] == state:
        _DERIVED_STATS["hits"] += 1
        return entry[1]
    live = [t for t in sources if t is not None]
    # float64: folded anew each call (as exact as unfused); CPU shared memory (share_memory(), Hogwild): another
    # process's writes move no version counter of this one's, so a kept fold would go stale without a sign. (A CUDA
    # tensor's is_shared() is always True: CUDA tensors handed to another process are clear_derived()'s case.)
    if any(t.dtype == torch.float64 or (t.device.type == "cpu" and t.is_shared()) for t in live):
        if entry is not None:
            _evict(key)
        return build()
    # The sources' storages (every one has a data pointer, read above), watched while the entry lives: each one's
    # finalizer evicts it, so no storage given to a source later (`.data = other`) can take a watched one's address.
    storages = {id(s): s for s in (t.untyped_storage() for t in live)}
    _DERIVED_STATS["misses"] += 1
    with torch.inference_mode(False), torch.no_grad():
        value = build()
    tensors = [v for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, torch.Tensor)]
    if _views_a_source(tensors, storages.values()):
        if entry is not None:
            _evict(key)
        return value
    if on_store is not None:
        on_store(value)
    finalizers = tuple(weakref.finalize(s, _evict, key) for s in storages.values())
    del storages
    size = sum(v.nbytes for v in tensors)
    del tensors
    with _DERIVED_LOCK:
        old = [_pop(key)]
        _DERIVED[key] = (state, value, finalizers, size)
        _DERIVED_BYTES[0] += size
        if len(_DERIVED) > _DERIVED_MAX_ENTRIES or _DERIVED_BYTES[0] > _DERIVED_MAX_BYTES:
            # the oldest stored first, never this one (the newest); over a copy of the keys (one C call), as a
            # collection inside the loop may run a finalizer that evicts another entry
            for oldest in list(_DERIVED):
                if oldest == key or (len(_DERIVED) <= _DERIVED_MAX_ENTRIES
                                     and _DERIVED_BYTES[0] <= _DERIVED_MAX_BYTES):
                    break
                old.append(_pop(oldest))
    while old:  # their finalizers detached and their values freed outside the lock
        _release(old.pop())
    return value


def _views_a_source(tensors, storages) -> bool:
    """Whether one of a derived value's tensors (the value, or those of its tuple) lies in one of its sources'
    storages."""
    ptrs = {s.data_ptr() for s in storages}
    return any(v.untyped_storage().data_ptr() in ptrs for v in tensors)


def _count_fused_step(optimizer, args, kwargs) -> None:
    """A fused optimizer step (`fused=True`: torch's Adam, AdamW, SGD, ...) writes the parameters in one kernel
    without bumping their version counters, which `derived` (and the cpu backend's kept Winograd transforms) key on:
    the step bumps them here, as every other in-place write does."""
    for group in optimizer.param_groups:
        if group.get("fused"):
            torch.autograd.graph.increment_version([p for p in group["params"] if isinstance(p, torch.Tensor)])


# Every optimizer's steps (one hook, registered once per process by the first import).
_FUSED_STEP_HOOK = register_optimizer_step_post_hook(_count_fused_step)


def derived_cache_info() -> dict[str, int]:
    """{"entries", "bytes", "hits", "misses"} of the derived-tensor cache (for tests)."""
    return {"entries": len(_DERIVED), "bytes": _DERIVED_BYTES[0], **_DERIVED_STATS}


def release_derived(tensors) -> None:
    """Drop the cached derivatives of these tensors (a module's parameters and buffers): the fused modules call it
    before their state is loaded or converted (deeplab_ops.modules.ReleasesDerived), which makes them stale, so that
    the memory they hold (a copy of the weights, their Winograd transforms) goes at once rather than when the old
    storages are freed."""
    tensors = list(tensors)
    ids = set(map(id, tensors))
    with _DERIVED_LOCK:
        keys = [key for key in list(_DERIVED) if not ids.isdisjoint(key[1:])]  # (a copy: see derived)
        entries = [_pop(key) for key in keys]
    while entries:  # outside the lock (see _release); each value freed here, none kept by a loop variable
        _release(entries.pop())
    # the cpu backend's kept Winograd transforms of the ASPP's branch weights, and those of the folds just freed
    weights = [t for t in tensors if t.device.type == "cpu" and t.dim() == 4]
    if weights:
        torch.ops.deeplab_ops.winograd_cache_release(weights)


def clear_derived() -> None:
    """Drop every cached derivative: after writing parameters through `.data`, or to free the memory. The cpu
    backend's Winograd transforms of the eval path's folded weights (csrc/cpu/winograd_cpu.h) go too."""
    with _DERIVED_LOCK:
        entries = list(_DERIVED.values())
        _DERIVED.clear()
        _DERIVED_BYTES[0] = 0
    for entry in entries:  # outside the lock (see _release)
        _release(entry)
    del entries
    torch.ops.deeplab_ops.winograd_cache_clear()

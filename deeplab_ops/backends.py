"""Backends: each backend's support rules in one place (`not_supported_reasons`), the automatic choice
(`resolve`: CUDA tensors triton then cuda, CPU tensors cpu; $DEEPLAB_OPS_BACKEND, checked by `env_backend`,
overrides None), the error listing every backend's reasons when no chosen one can run a call, and the device checks
of `available_backends`/`auto_backend`.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from deeplab_ops import _extension
from deeplab_ops.common import (
    HALF_DTYPES,
    INT32_MAX,
    conv_output_size,
    interpreter_active,
    interpreter_dtype_refusal,
    jit_tracing,
)

BACKENDS = ("reference", "cpu", "cuda", "triton")
OPS = ("conv_bn_relu", "aspp", "upsample_cross_entropy")
ENV_VAR = "DEEPLAB_OPS_BACKEND"


# Looked up once, at import (find_spec imports nothing): a call traced by torch.compile then reads a constant
# (torch 2.6's Dynamo cannot trace find_spec, nor a functools.cache around it on its first call).
_TRITON_IMPORT_ERROR = None if importlib.util.find_spec("triton") is not None else \
    "triton is not installed (pip install triton)"


def triton_import_error() -> str | None:
    """None when triton can be imported, else why not (checked without importing it)."""
    return _TRITON_IMPORT_ERROR


NO_CUDA_DEVICE = "no CUDA device is visible here (torch.cuda.is_available() is False)"


def _device_reasons(backend: str, device: torch.device) -> list[str]:
    if backend == "reference" or (device.type == "meta" and backend in BACKENDS):
        return []  # meta tensors: every op has a fake kernel that computes shapes only
    if backend == "cpu":
        return [] if device.type == "cpu" else [f"it runs CPU tensors, got a tensor on {device}"]
    # a CUDA device asked about where none is visible (available_backends("cuda") on a CPU machine)
    reasons = [NO_CUDA_DEVICE] if device.type == "cuda" and not torch.cuda.is_available() else []
    if backend == "cuda":
        if device.type != "cuda":
            reasons.append(f"it runs CUDA tensors, got a tensor on {device}")
        if not _extension.cuda_kernels_compiled():
            why = _extension.cuda_build_reason()
            reasons.append(
                f"deeplab_ops._C was built without the CUDA kernels{f' ({why})' if why else ''}: rebuild with a CUDA "
                "build of torch and a CUDA toolkit of its major version, with DEEPLAB_OPS_CUDA=1 to make anything "
                "missing an error"
            )
        return reasons
    if backend == "triton":
        error = triton_import_error()
        if error:
            reasons.append(error)
        if device.type == "cpu" and not interpreter_active():
            reasons.append("it runs CPU tensors only in the Triton interpreter (TRITON_INTERPRET=1)")
        elif device.type not in ("cpu", "cuda"):
            reasons.append(f"it runs CUDA tensors, got a tensor on {device}")
        return reasons
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


# ---- per-op rules beyond device and build ---------------------------------------------------------------


def _interpreter_half(t: torch.Tensor, name: str) -> list[str]:
    refusal = interpreter_dtype_refusal(t.dtype) if t.device.type == "cpu" and t.dtype in HALF_DTYPES else ""
    return [f"{name} has dtype {t.dtype}: {refusal}"] if refusal else []


def _int32(largest: int) -> list[str]:
    if largest > INT32_MAX:
        return [f"a tensor of {largest} elements: the kernels index with int32 (at most {INT32_MAX})"]
    return []


# CUDA's limit on a launch grid's second (and third) axis. The triton kernels put channel blocks there: of at least
# CHANNEL_BLOCK channels (conv forward C_out, dgrad C_in; the ASPP's branches, each its own blocks, and its dgrad's
# C_in) and of at least CLASS_BLOCK classes (upsample_cross_entropy's backward). The interpreter has no such limit,
# a GPU refuses the launch ("invalid argument"): tests/triton/test_kernel_limits.py holds the kernels' block sizes
# to these minima.
GRID_Y_MAX = 65535
CHANNEL_BLOCK = 16
CLASS_BLOCK = 8
CHANNELS_MAX = GRID_Y_MAX * CHANNEL_BLOCK


def _grid_y(blocks: int, what: str) -> list[str]:
    return [f"{what}: {blocks} blocks on the launch grid's second axis, beyond CUDA's limit of {GRID_Y_MAX}"]


# (Each compares first and builds its message only beyond the limit: the rules run on every triton call.)
def conv_grid_y(x: torch.Tensor, weight: torch.Tensor) -> list[str]:
    """Why a triton conv_bn_relu call's channel blocks exceed the launch grid (empty when they fit)."""
    c = max(x.shape[1], weight.shape[0])
    if c <= CHANNELS_MAX:
        return []
    return _grid_y(-(-c // CHANNEL_BLOCK), f"{c} channels (in blocks of {CHANNEL_BLOCK})")


def aspp_grid_y(x: torch.Tensor, rates, channels: int) -> list[str]:
    """Why a triton aspp call's channel blocks exceed the launch grid (empty when they fit)."""
    branches = 1 + len(rates)
    blocks = branches * -(-channels // CHANNEL_BLOCK)
    if blocks > GRID_Y_MAX:
        return _grid_y(blocks, f"{branches} branches of {channels} channels (each in blocks of {CHANNEL_BLOCK})")
    if x.shape[1] > CHANNELS_MAX:
        return _grid_y(-(-x.shape[1] // CHANNEL_BLOCK), f"{x.shape[1]} input channels (in blocks of {CHANNEL_BLOCK})")
    return []


def uce_grid_y(logits: torch.Tensor) -> list[str]:
    """Why a triton upsample_cross_entropy call's class blocks exceed the launch grid (empty when they fit)."""
    k = logits.shape[1]
    if k <= GRID_Y_MAX * CLASS_BLOCK:
        return []
    return _grid_y(-(-k // CLASS_BLOCK), f"{k} classes (in blocks of {CLASS_BLOCK})")


def _no_group(synchronized: bool) -> list[str]:
    if synchronized:
        return ["it has no synchronized BatchNorm (a process_group in training): use backend='cuda' or 'cpu'"]
    return []


def conv_largest(x: torch.Tensor, weight: torch.Tensor, out_numel: int) -> int:
    """The most elements of one tensor a triton conv_bn_relu call indexes: x, its output, the weight."""
    return max(x.numel(), out_numel, weight.numel())


def conv_reach(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> int:
    """The largest index sum a triton conv kernel forms along H or W: the padded input extent plus the kernel's
    dilated extent and one stride (its tap-hit and tile arithmetic adds them in int32)."""
    return max(x.shape[2 + i] + 2 * padding[i] + dilation[i] * (weight.shape[2 + i] - 1) + stride[i] for i in (0, 1))


def aspp_reach(x: torch.Tensor, rates) -> int:
    """conv_reach of the ASPP's widest branch (3 x 3, padding and dilation the largest rate, stride 1); 0 without
    rates (the 1 x 1 branch alone reaches no further than the input)."""
    return max(x.shape[2:]) + 4 * max(rates) + 1 if rates else 0


def _reach32(reach: int) -> list[str]:
    if reach > INT32_MAX:
        return [f"a padded extent of {reach} (input size + 2·padding + dilation·(kernel − 1) + stride): the kernels "
                f"index with int32 (at most {INT32_MAX})"]
    return []


def aspp_largest(x: torch.Tensor, rates, channels: int) -> int:
    """The most elements of one tensor a triton aspp call indexes: x, the (N, H, W, (1 + len(rates)) * C) branch
    buffer, the packed branch weights, and the projection weight's branch columns ((1 + len(rates)) * C by C, the
    projection kernels' operand, whose shape their weight-gradient partials have too): with few input channels and
    many output channels (C_in = 256, C >= 23171 at three rates) the last is the largest."""
    n, c_in, h, w = x.shape
    branches = 1 + len(rates)
    return max(x.numel(), n * h * w * branches * channels, (1 + 9 * len(rates)) * c_in * channels,
               branches * channels * channels)


def refuse_beyond_kernel_limits(op: str, largest: int, reach: int = 0, grid_y: list[str] = ()) -> None:
    """Raise for a call of a triton twin (torch.ops.deeplab_ops.triton_*, called directly or from a traced graph)
    whose largest tensor is beyond the kernels' int32 indexing (on a GPU its offsets would wrap), or whose channel
    blocks exceed the launch grid (`grid_y`: conv_grid_y's, aspp_grid_y's or uce_grid_y's reasons): the rules by
    which `resolve` never picks triton for such a call."""
    reasons = _int32(largest)
    if reasons:
        raise ValueError(f"deeplab_ops.{op}: {reasons[0]}: use backend='cuda' or a smaller batch")
    reasons = _reach32(reach) + list(grid_y)
    if reasons:
        raise ValueError(f"deeplab_ops.{op}: {reasons[0]}: use backend='cuda' or 'cpu'")


def _triton_conv_bn_relu(*, x, weight, stride, padding, dilation, synchronized=False, **_) -> list[str]:
    n, _, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho, wo = conv_output_size((h, w), (kh, kw), stride, padding, dilation)
    return (_interpreter_half(x, "x") + _int32(conv_largest(x, weight, n * cout * ho * wo))
            + _reach32(conv_reach(x, weight, stride, padding, dilation)) + conv_grid_y(x, weight)
            + _no_group(synchronized))


def _triton_aspp(*, x, rates, channels, synchronized=False, **_) -> list[str]:
    return (_interpreter_half(x, "x") + _int32(aspp_largest(x, rates, channels)) + _reach32(aspp_reach(x, rates))
            + aspp_grid_y(x, rates, channels) + _no_group(synchronized))


def _triton_uce(*, logits, target, **_) -> list[str]:
    return _interpreter_half(logits, "logits") + _int32(max(logits.numel(), target.numel())) + uce_grid_y(logits)


_OP_RULES = {
    ("triton", "conv_bn_relu"): _triton_conv_bn_relu,
    ("triton", "aspp"): _triton_aspp,
    ("triton", "upsample_cross_entropy"): _triton_uce,
}


def has_call_rules(backend: str, op: str) -> bool:
    """Whether `backend` decides per call (from the call's tensors and sizes) if it can run `op`: when not, its
    answer for a device never changes and callers may remember it."""
    return (backend, op) in _OP_RULES


def not_supported_reasons(backend: str, op: str, device: torch.device, **call) -> list[str]:
    """Why `backend` cannot run this call of `op` on `device`; empty when it can."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    reasons = _device_reasons(backend, device)
    rule = _OP_RULES.get((backend, op))
    if rule is not None and not reasons and call:
        reasons.extend(rule(**call))
    return reasons


def auto_candidates(device: torch.device) -> tuple[str, ...]:
    return ("triton", "cuda") if device.type == "cuda" else ("cpu",)


def _not_a_backend(source: str, value) -> ValueError:
    """The error for a backend name that names none (`source`: the argument or the environment variable)."""
    return ValueError(f"{source}={value!r} is not a backend; expected one of {('auto', *BACKENDS)} or "
                      + ("unset" if source == ENV_VAR else "None"))


def env_backend() -> str | None:
    """$DEEPLAB_OPS_BACKEND checked: the backend it names, or None when it is unset, empty or 'auto'."""
    value = os.environ.get(ENV_VAR)
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise _not_a_backend(ENV_VAR, value)
    return value


def resolve(backend: str | None, op: str, device: torch.device, **call) -> str:
    """The backend that runs this call: `backend`, else $DEEPLAB_OPS_BACKEND, else `auto`."""
    source = "backend"
    if backend is None:
        backend = os.environ.get(ENV_VAR) or "auto"  # a bad value is refused just below, as env_backend does
        source = ENV_VAR
    if backend != "auto" and backend not in BACKENDS:
        raise _not_a_backend(source, backend)
    if (not call.get("synchronized") and (jit_tracing() is not None or torch.compiler.is_exporting())
            and torch.onnx.is_in_onnx_export()):
        # torch.onnx.export records the call (its TorchScript exporter traces with torch.jit, its dynamo one with a
        # non-strict torch.export; both set is_in_onnx_export, which dynamo's strict tracing reads as False). ONNX has
        # no deeplab_ops ops: the reference's aten ops (conv2d, batch_norm, interpolate, ...) export. (A synchronized
        # BatchNorm has no ONNX form: left to the backend, whose op the export then fails on.)
        return "reference"
    if backend != "auto":
        reasons = not_supported_reasons(backend, op, device, **call)
        if reasons:
            raise RuntimeError(
                f"deeplab_ops.{op}: {source}={backend!r} cannot run this call: {'; '.join(reasons)}.\n"
                + _report(op, device, call)
            )
        return backend
    candidates = auto_candidates(device)
    for name in candidates:
        if not not_supported_reasons(name, op, device, **call):
            return name
    able = [name for name in BACKENDS if not not_supported_reasons(name, op, device, **call)]
    raise RuntimeError(
        f"deeplab_ops.{op}: the automatic choice (backend=None) for tensors on {device} is among "
        f"{', '.join(candidates)}, and none of them can run this call"
        + (f"; pass backend={able[0]!r}, which can" if able else "") + ".\n" + _report(op, device, call)
    )


# Backends chosen for calls that no per-call rule can change: (op, backend, $DEEPLAB_OPS_BACKEND when backend is None,
# device, synchronized) -> name. `resolve` decides from these alone unless a backend it considers has a rule of its
# own for the op's arguments (triton: int32 sizes, grid limits, half types in the interpreter): those calls resolve
# every time. Failures are never remembered (the error is raised again).
_RESOLVED: dict[tuple, str] = {}
# os.environ's own dict (encoded keys and values), which os.environ[...] = and del keep current: one dict lookup
# per call where os.environ.get goes through the Mapping machinery (~0.6 us here).
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if _ENV_DATA is not None else None


def resolve_remembered(backend: str | None, op: str, device: torch.device, synchronized: bool, **call) -> str:
    """`resolve` for a call entered directly (dispatch.enter_directly: not traced, so no ONNX export records it),
    remembered where no backend it considers decides per call: the front doors' per-call path."""
    env = None
    if backend is None:  # (the variable's raw value as the key)
        env = _ENV_DATA.get(_ENV_KEY) if _ENV_DATA is not None else os.environ.get(ENV_VAR)
    elif type(backend) is not str:  # (no key: resolve refuses it by name)
        return resolve(backend, op, device, synchronized=synchronized, **call)
    key = (op, backend, env, device, synchronized)
    name = _RESOLVED.get(key)
    if name is not None:
        return name
    name = resolve(backend, op, device, synchronized=synchronized, **call)
    considered = (name,)
    if ((os.environ.get(ENV_VAR) or "auto") if backend is None else backend) == "auto":
        candidates = auto_candidates(device)
        considered = candidates[:candidates.index(name) + 1] if name in candidates else candidates
    if not any(has_call_rules(c, op) for c in considered) and len(_RESOLVED) < 64:
        _RESOLVED[key] = name
    return name


def _report(op: str, device: torch.device, call: dict) -> str:
    lines = []
    for name in BACKENDS:
        reasons = not_supported_reasons(name, op, device, **call)
        lines.append(f"  {name}: " + ("can run it" if not reasons else "; ".join(reasons)))
    return "Backends here:\n" + "\n".join(lines)


def as_device(device, argument: str = "device") -> torch.device:
    """`device` as a torch.device; a ValueError naming `argument` when it is not one."""
    if isinstance(device, torch.device):
        return device
    try:
        if isinstance(device, str):
            return torch.device(device)
        if isinstance(device, int) and not isinstance(device, bool):
            return torch.device("cuda", device)  # (torch.device(0) needs a visible accelerator on torch 2.6)
    except (RuntimeError, ValueError, OverflowError):
        pass
    raise ValueError(f"{argument}={device!r} is not a device; expected a torch.device, a device string such as "
                     "'cpu', 'cuda' or 'cuda:0', or a CUDA device index")


def available_backends(device: str | torch.device = "cpu") -> dict[str, list[str]]:
    """For each backend, the reasons it cannot run on `device` (an empty list: it can)."""
    device = as_device(device)
    return {name: _device_reasons(name, device) for name in BACKENDS}


def auto_backend(device: str | torch.device) -> str | None:
    """What `backend=None` picks for tensors on `device` (ignoring per-call limits), or None when no backend it
    may pick can run them (raises ValueError when $DEEPLAB_OPS_BACKEND names no backend, as every op call would)."""
    device = as_device(device)
    forced = env_backend()
    for name in (forced,) if forced else auto_candidates(device):
        if not _device_reasons(name, device):
            return name
    return None

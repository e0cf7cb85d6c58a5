"""The bottom layer: shape, dtype and layout helpers and the parameter-derived cache, imported by ops/, triton/
and nn (this module imports none of them).
"""

from __future__ import annotations

import numbers
import weakref

import torch
from torch._prims_common import suggest_memory_format

Tensor = torch.Tensor

INT32_MAX = 2**31 - 1
HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


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


def conv_output_size(
    size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """Spatial output size of a convolution (may be < 1 for invalid geometry)."""
    return (
        (size[0] + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1,
        (size[1] + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1,
    )


def empty_activation(like: Tensor, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """An empty 4-D activation in `like`'s memory format (what the kernels return for outputs)."""
    return torch.empty(
        shape if shape is not None else like.shape,
        dtype=dtype or like.dtype,
        device=like.device,
        memory_format=suggest_memory_format(like),
    )


def to_nhwc(t: Tensor) -> Tensor:
    """(N, C, H, W) -> contiguous (N, H, W, C): a view for channels_last tensors, one copy for NCHW ones."""
    return t.permute(0, 2, 3, 1).contiguous()


def from_nhwc(t: Tensor, memory_format: torch.memory_format) -> Tensor:
    """(N, H, W, C) -> (N, C, H, W) in `memory_format`: a view for channels_last, one copy for NCHW."""
    return t.permute(0, 3, 1, 2).contiguous(memory_format=memory_format)


# ---- tensors derived from parameters, cached per parameter version --------------------------------------------
#
# A packed/transposed weight or a BatchNorm folded into a conv is a pure function of a few parameters and buffers.
# It is rebuilt only when one of them changed: the key holds each tensor's storage pointer and its version counter,
# which every in-place write bumps (optimizer steps, load_state_dict, running-statistics updates). An entry lives
# as long as the first tensor of its key (weakref finalizer), so the cache never keeps a freed parameter's
# derivative alive. Under torch.compile and CUDA-graph capture nothing is cached: the derivation is part of the
# graph, so a replay after an optimizer step recomputes it.

_DERIVED: dict[tuple, tuple[tuple, object]] = {}


def _stamp(tensors) -> tuple:
    return tuple((None, 0) if t is None else (t.data_ptr(), t._version) for t in tensors)


def derived(tag, tensors: tuple, build):
    """`build()` for these tensors, cached until one of them is written to or replaced. `tag` names the kind of
    derivative (and any non-tensor inputs); tensors[0] must not be None: the entry dies with it."""
    owner = tensors[0]
    if torch.compiler.is_compiling() or (owner.is_cuda and torch.cuda.is_current_stream_capturing()):
        # Traced or captured: a cache hit would leave the derivation out of the graph, and a replay after the
        # parameters changed would read a stale value. Build it inside the graph instead.
        return build()
    key = (tag, id(owner), *(id(t) for t in tensors[1:]))
    stamp = _stamp(tensors)
    hit = _DERIVED.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = build()
    if hit is None:
        weakref.finalize(owner, _DERIVED.pop, key, None)
    _DERIVED[key] = (stamp, value)
    return value


def clear_derived() -> None:
    """Drop every cached derivative (tests; freeing memory)."""
    _DERIVED.clear()

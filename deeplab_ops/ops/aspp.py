"""aspp: argument checks, fake kernels, the one autograd, the public function. Schemas in csrc/ops.cpp
(`aspp_forward/_backward` for cpu and cuda, `triton_` twins for triton); the ops take every BatchNorm's tensors
concatenated (docs/ops.md; how per-BatchNorm lists avoid the cat: docs/performance.md).
"""

from __future__ import annotations

import collections.abc
import contextlib
import itertools
import operator

import torch
from torch._prims_common import suggest_memory_format

from deeplab_ops import backends, reference
from deeplab_ops.common import (
    FLOAT_DTYPES,
    HALF_DTYPES,
    INT32_MAX,
    autocast_cast,
    autocast_dtype,
    back_to_back,
    check_bn_numbers,
    check_running_writable,
    check_x_channels,
    conv_layout,
    empty_activation,
    functorch_transform,
    graph_for_every_grad_mode,
    is_functorch_wrapped,
    opmath_dtype,
    refuse_layout,
    refuse_running_grad,
    strided_like,
)
from deeplab_ops.ops.dispatch import (
    any_requires_grad,
    autograd_kernels,
    backend_for_batch,
    below_autograd,
    call_backward,
    conv_flops,
    enter_directly,
    group_name_of,
    refuse_forward_ad,
    refuse_grad_transforms,
    register_autograd_kernels,
    register_fake,
    register_flops,
)
from deeplab_ops.triton import call_checked, validate_with

Tensor = torch.Tensor
_ops = torch.ops.deeplab_ops

FORWARD = {"cpu": _ops.aspp_forward.default, "cuda": _ops.aspp_forward.default,
           "triton": _ops.triton_aspp_forward.default}
BACKWARD = {"cpu": _ops.aspp_backward.default, "cuda": _ops.aspp_backward.default,
            "triton": _ops.triton_aspp_backward.default}


# ---- fake kernels ----------------------------------------------------------------------------------


def _forward_fake(x, conv_weights, pool_weight, project_weight, bn_weight, bn_bias, running_mean, running_var, rates,
                  training, momentum, eps, group_name=None, memory_efficient=False):
    n, _, h, w = x.shape
    c = conv_weights[0].shape[0]
    b = len(conv_weights)
    stat = opmath_dtype(x.dtype)
    k = (b + 2) * c
    updates = training and running_mean is not None
    rdt = running_mean.dtype if running_mean is not None else stat
    return (
        empty_activation(x, (n, c, h, w)),
        [empty_activation(x, (n, c, h, w)) for _ in range(b)],
        x.new_empty((n, c)),
        empty_activation(x, (n, c, h, w)),
        x.new_empty((k,), dtype=stat),
        x.new_empty((k,), dtype=stat),
        x.new_empty((k if updates else 0,), dtype=rdt),
        x.new_empty((k if updates else 0,), dtype=rdt),
    )


def _triton_forward_fake(x, conv_weights, *args, **kwargs):
    # The triton twin returns its one branch buffer (N, B*C, H, W) and project_out channels_last whatever x's
    # format: only its backward reads them, as NHWC.
    out, branch, pool_pre, proj, *rest = _forward_fake(x, conv_weights, *args, **kwargs)
    n, c, h, w = out.shape
    cl = torch.channels_last
    buffer = empty_activation(x, (n, len(conv_weights) * c, h, w), memory_format=cl)
    return (out, [buffer], pool_pre, empty_activation(proj, memory_format=cl), *rest)


def _backward_fake(grad_out, x, conv_weights, pool_weight, project_weight, bn_weight, bn_bias, branch_out, pool_out,
                   project_out, out, save_mean, save_invstd, rates, training, output_mask, group_name=None):
    want_x, want_w, want_bn = output_mask
    stat = save_mean.dtype
    k = save_mean.shape[0]
    # Each weight gradient dense in its weight's memory format, with the weight's own strides where the two differ
    # only in dimensions of size 1 (the kernels' strided_like_param); never the weight's strides as such
    # (empty_like), which for a transposed or expanded weight are not the kernels'.
    return (
        empty_activation(x) if want_x else None,
        [strided_like(empty_activation(w), w) for w in conv_weights] if want_w else [],
        strided_like(empty_activation(pool_weight), pool_weight) if want_w else None,
        strided_like(empty_activation(project_weight), project_weight) if want_w else None,
        x.new_empty((k,), dtype=stat) if want_bn else None,
        x.new_empty((k,), dtype=stat) if want_bn else None,
    )


# ---- autograd: one implementation for both twins ------------------------------------------------------
#
# Saving policy, chosen by memory_efficient:
#   saved      the pre-BN branch outputs (branch_out: one (N, C, H, W) tensor per conv branch for the composite,
#              one (N, B*C, H, W) buffer for the triton twin), the pooling vector (N, C) and the projection's pre-BN
#              output (N, C, H, W) are saved by the forward.
#   recompute  none of them is kept: the backward runs the same forward op once more (no running-statistics
#              update; eval: with the running statistics the forward read) for those buffers and hands them to the
#              unchanged backward op with the statistics the forward saved. Recompute rather than rebuild from the
#              output: the branch outputs must be recomputed whatever is done with the projection, and with them in
#              hand the projection's pre-BN output is one 1x1 conv of B*C -> C channels (about 2% of the 3x3
#              branches' FLOPs at C_in = 2048, C = 256). Same op, backend, inputs and statistics: the very buffers
#              the forward produced, so the gradients are those of the saving policy.
# The statistics reducer is the process group named by group_name (None: local).


_DOUBLE_BACKWARD = "deeplab_ops.aspp does not support double backward; use backend='reference' for it"
_FORWARD_BY_PREFIX = {"": FORWARD["cpu"], "triton_": FORWARD["triton"]}
_BACKWARD_BY_PREFIX = {"": BACKWARD["cpu"], "triton_": BACKWARD["triton"]}


def _as_differentiated(x: Tensor) -> Tensor:
    """x as the op must see it inside the autograd Function: requiring grad (an alias of it where it does not; no copy),
    so that the cpu composite runs a training step's convolutions (csrc/composite/conv_calls.h inference_call), in the
    forward and in the memory-efficient backward's recompute alike. (An inference tensor, which cannot require grad
    outside inference mode, is passed as it is: a graph cannot save it anyway.)"""
    if x.requires_grad or x.is_inference():
        return x
    return x.detach().requires_grad_()


# The autograd Function's arguments before its tensors (*tensors: the conv weights, then the per-BatchNorm parts):
# prefix, x, pool_weight, project_weight, bn_weight, bn_bias, running_mean, running_var, rates, training, momentum,
# eps, group_name, memory_efficient, n_conv. needs_input_grad and the gradients returned are indexed so.
_FIXED = 15


class _ASPP(torch.autograd.Function):
    """The Autograd kernel of aspp_forward and triton_aspp_forward (`prefix` picks the twin). The conv weights come
    last, unpacked (autograd tracks tensors, not lists of them)."""

    @staticmethod
    def forward(ctx, prefix, x, pool_weight, project_weight, bn_weight, bn_bias, running_mean, running_var, rates,
                training, momentum, eps, group_name, memory_efficient, n_conv, *tensors):
        conv_weights = tensors[:n_conv]
        # Grad mode on (Function.forward turns it off) and an x that requires grad: the op sees that a gradient will
        # flow, so its convolutions are the ones a training step is checked against (never the inference-only
        # Winograd of the cpu backend), also where the only inputs wanting a gradient are the per-BatchNorm parts
        # that bn_weight and bn_bias alias (detached views the op would take for constants).
        with torch.enable_grad():
            result = below_autograd(_FORWARD_BY_PREFIX[prefix], _as_differentiated(x), list(conv_weights),
                                    pool_weight, project_weight, bn_weight, bn_bias, running_mean, running_var, rates,
                                    training, momentum, eps, group_name, memory_efficient)
        out, branch, pool_pre, proj, mean, invstd, new_rm, new_rv = result
        branch = list(branch)
        if training and running_mean is not None:
            # The running statistics are written here, before anything is saved for the backward (the front door
            # writes them only for a call that built no node): torch.utils.checkpoint(use_reentrant=False) stops its
            # recomputation inside the packing of a region's last saved tensor, after eager BatchNorm updated its
            # statistics, and so after these writes.
            running_mean.copy_(new_rm)
            running_var.copy_(new_rv)
        ctx.mark_non_differentiable(*branch, pool_pre, proj, mean, invstd, new_rm, new_rv)
        ctx.set_materialize_grads(False)
        if memory_efficient:
            # Training normalizes with batch statistics: the recompute needs no running statistics (and must not
            # update them). Eval normalizes with the running statistics, which the recompute reads again.
            keep = (None, None, None, None) if training else (None, None, running_mean, running_var)
            branch = []
        else:
            keep = (pool_pre, proj, None, None)
        # The per-BatchNorm parts (bn_weight and bn_bias then alias them, as views of the first part's storage that
        # share only its version counter) are saved too, unread: autograd's in-place check then covers each of them,
        # as eager BatchNorm's saved weight does (a write to one between forward and backward raised nothing, and
        # the backward read the new values: a silently wrong gradient).
        ctx.save_for_backward(x, pool_weight, project_weight, bn_weight, bn_bias, out, mean, invstd, *keep,
                              *conv_weights, *tensors[n_conv:], *branch)
        ctx.conf = (prefix, list(rates), training, momentum, eps, group_name, memory_efficient, n_conv,
                    len(tensors) - n_conv)
        # branch_out's tensors are outputs of their own (a list is no output to autograd): the kernel below lists
        # them again.
        return out, *branch, pool_pre, proj, mean, invstd, new_rm, new_rv

    @staticmethod
    def backward(ctx, grad_out, *unused):
        prefix, rates, training, momentum, eps, group_name, memory_efficient, n_conv, n_parts = ctx.conf
        # needs_input_grad: (prefix, x, pool_w, proj_w, bn_w, bn_b, rm, rv, rates, ..., n_conv, *conv_weights,
        # *bn_parts): bn_parts, when given, are the per-BatchNorm weights then biases that bn_w and bn_b alias.
        nig = ctx.needs_input_grad
        mask = [nig[1], any(nig[_FIXED:_FIXED + n_conv]) or nig[2] or nig[3],
                nig[4] or nig[5] or any(nig[_FIXED + n_conv:])]
        grads = [None] * (_FIXED + n_conv + n_parts)
        if grad_out is None or not any(mask):
            return tuple(grads)
        (x, pool_w, proj_w, bn_w, bn_b, out, mean, invstd, pool_pre, proj, rm, rv, *rest) = ctx.saved_tensors
        conv_ws, branch = list(rest[:n_conv]), list(rest[n_conv + n_parts:])
        x_format = None
        if memory_efficient:
            xr = x
            if prefix == "triton_" and not x.is_contiguous(memory_format=torch.channels_last):
                # The triton kernels read x as NHWC in the recompute and in the weight gradient: convert it once
                # for both (and the recompute's discarded `out` is then a view, not a conversion back).
                x_format, xr = suggest_memory_format(x), x.contiguous(memory_format=torch.channels_last)
            with torch.enable_grad():  # the forward's convolutions again (see forward)
                _, branch, pool_pre, proj, _, _, _, _ = below_autograd(
                    _FORWARD_BY_PREFIX[prefix], _as_differentiated(xr), conv_ws, pool_w, proj_w, bn_w, bn_b, rm, rv,
                    rates, training, momentum, eps, group_name, False)
            x = xr
        gx, gconv, gpool, gproj, gbw, gbb = call_backward(
            _BACKWARD_BY_PREFIX[prefix], grad_out, x, conv_ws, pool_w, proj_w, bn_w, bn_b, branch, pool_pre, proj,
            out, mean, invstd, rates, training, mask, group_name,
        )
        if x_format is not None and gx is not None:
            gx = gx.contiguous(memory_format=x_format)  # grad_x in x's own format, as without the conversion
        if gbw is not None and gbw.dtype != bn_w.dtype:
            gbw = gbw.to(bn_w.dtype)
        if gbb is not None and gbb.dtype != bn_b.dtype:
            gbb = gbb.to(bn_b.dtype)
        grads[1], grads[2], grads[3] = gx, gpool, gproj
        if gconv:
            grads[_FIXED:_FIXED + n_conv] = gconv
        if n_parts and gbw is not None:  # per-BatchNorm gradients: views of the concatenated ones, no copy
            grads[_FIXED + n_conv:] = (*gbw.chunk(n_parts // 2), *gbb.chunk(n_parts // 2))
        else:
            grads[4], grads[5] = gbw, gbb
        return tuple(grads)


def _autograd_kernel(prefix: str):
    """The Autograd kernel of `{prefix}aspp_forward`: the Function when a graph is built, else the op below
    Autograd. The dispatcher drops trailing arguments equal to their defaults: they get them back here. bn_parts
    (the front door only): the per-BatchNorm weights and biases that bn_weight and bn_bias alias."""
    forward = _FORWARD_BY_PREFIX[prefix]
    apply = _ASPP.apply

    def kernel(x, conv_weights, pool_weight, project_weight, bn_weight, bn_bias, running_mean, running_var, rates,
               training, momentum, eps, group_name=None, memory_efficient=False, bn_parts=()):
        refuse_forward_ad("aspp", x, conv_weights, pool_weight, project_weight, bn_weight, bn_bias, bn_parts)
        if torch.is_grad_enabled() and any_requires_grad(x, conv_weights, pool_weight, project_weight, bn_weight,
                                                         bn_bias, bn_parts):
            out, *branch, pool_pre, proj, mean, invstd, new_rm, new_rv = apply(
                prefix, x, pool_weight, project_weight, bn_weight, bn_bias, running_mean, running_var, rates,
                training, momentum, eps, group_name, memory_efficient, len(conv_weights), *conv_weights, *bn_parts)
            return out, branch, pool_pre, proj, mean, invstd, new_rm, new_rv
        return below_autograd(forward, x, conv_weights, pool_weight, project_weight, bn_weight, bn_bias,
                              running_mean, running_var, rates, training, momentum, eps, group_name,
                              memory_efficient)

    return kernel


for _prefix, _fwd_fake in (("", _forward_fake), ("triton_", _triton_forward_fake)):
    register_fake(f"deeplab_ops::{_prefix}aspp_forward")(_fwd_fake)
    register_fake(f"deeplab_ops::{_prefix}aspp_backward")(_backward_fake)
register_autograd_kernels("aspp", _autograd_kernel, _DOUBLE_BACKWARD)
_KERNELS = autograd_kernels(_autograd_kernel)


# ---- FLOP counts (torch.utils.flop_counter; tensors arrive as their shapes) ------------------------------------------
#
# As FlopCounterMode counts torchvision's ASPP: each branch convolution over the image, the pooling branch's 1x1
# convolution of the pooled (N, C_in, 1, 1) input, and the projection of the (R + 2) x C concatenation.

def _aspp_parts_flops(x, conv_weights, pool_weight, project_weight, out) -> tuple[int, int, int]:
    """(branches, pooling branch, projection) FLOPs of one pass."""
    n, c, h, w = out
    branches = sum(conv_flops(x, wt, out) for wt in conv_weights)
    pool = conv_flops((n, x[1], 1, 1), pool_weight, (n, c, 1, 1))
    project = conv_flops((n, project_weight[1], h, w), project_weight, out)
    return branches, pool, project


def _aspp_forward_flops(x, conv_weights, pool_weight, project_weight, *args, out_shape, **kwargs) -> int:
    return sum(_aspp_parts_flops(x, conv_weights, pool_weight, project_weight, out_shape[0]))


def _aspp_backward_flops(grad_out, x, conv_weights, pool_weight, project_weight, bn_weight, bn_bias, branch_out,
                         pool_out, project_out, out, save_mean, save_invstd, rates, training, output_mask, *args,
                         out_shape, **kwargs) -> int:
    want_x, want_w = bool(output_mask[0]), bool(output_mask[1])
    branches, pool, project = _aspp_parts_flops(x, conv_weights, pool_weight, project_weight, grad_out)
    # the projection's input gradient feeds every other gradient; each layer's weight gradient and the branches'
    # input gradients cost its forward's products
    return project * ((want_x or want_w) + want_w) + (branches + pool) * (want_x + want_w)


for _prefix in ("", "triton_"):
    register_flops([f"{_prefix}aspp_forward"], _aspp_forward_flops)
    register_flops([f"{_prefix}aspp_backward"], _aspp_backward_flops)


# ---- argument checks -------------------------------------------------------------------------------


def _describe(value) -> str:
    """What a list argument was given as, for an error: its type and length, or a tensor's shape (never its
    values: a tensor's repr can run to pages)."""
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of length {len(value)}"
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__ if value is not None else "None"


_REPEAT = itertools.repeat
_LISTS = (list, tuple)  # filled in with Packed below
_LAYOUT, _DEVICE = operator.attrgetter("layout"), operator.attrgetter("device")
_DTYPE, _SHAPE = operator.attrgetter("dtype"), operator.attrgetter("shape")


def _check_bn(value, name: str, n_bn: int, c: int, allow_none: bool = False) -> list | Tensor | None:
    """One BatchNorm argument: a list of n_bn (C,) tensors, or one (n_bn * C,) tensor (already concatenated)."""
    if value is None and allow_none:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.shape[0] != n_bn * c:
            raise ValueError(f"{name} given as one tensor must have shape ({n_bn * c},) (the {n_bn} BatchNorms' "
                             f"{c} channels concatenated), got {tuple(value.shape)}")
        return value
    if not isinstance(value, (list, tuple)) or len(value) != n_bn:
        got = _describe(value)
        raise ValueError(f"{name} must be a list of {n_bn} tensors (1x1 branch, one per rate, pooling, "
                         f"projection) or one ({n_bn * c},) tensor, got {got}")
    for i, t in enumerate(value):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (c,):
            raise ValueError(f"{name}[{i}] must have shape ({c},), got {tuple(t.shape)}")
    return value if type(value) is Packed else list(value)


def is_rate_sequence(rates) -> bool:
    """Whether `rates` is an ordered sequence that may hold the ASPP's rates: a list, tuple, range, numpy array or
    1-D tensor (not a str, and not a set, whose order would pair rates with the wrong weights)."""
    return ((isinstance(rates, collections.abc.Sequence) and not isinstance(rates, (str, bytes)))
            or (type(rates).__module__ == "numpy" and getattr(rates, "ndim", None) == 1)
            or (isinstance(rates, torch.Tensor) and rates.dim() == 1))


def checked_rates(rates, name: str = "rates") -> tuple[int, ...]:
    """`rates` as a tuple of ints, from any ordered sequence of integers >= 1 (is_rate_sequence: what torchvision's
    ASPP iterates over; numpy integers and 0-d integer tensors count as ints); a ValueError naming `name` for
    anything else."""
    ints = None
    if is_rate_sequence(rates):
        values = tuple(rates)
        # (bools are refused: Python's and numpy's, by type name, and bool tensors; a tensor element must be 0-d,
        # and hold a value: a meta tensor's has none)
        if not any([type(r).__name__ in ("bool", "bool_") or (isinstance(r, torch.Tensor) and (
                r.dtype == torch.bool or r.dim() != 0 or r.is_meta)) for r in values]):
            try:
                ints = tuple([operator.index(r) for r in values])
            except TypeError:
                pass
    if ints is None or not all([r >= 1 for r in ints]):
        raise ValueError(f"{name} must be a sequence (tuple, list, range, ...) of ints >= 1, got {rates!r}")
    return ints


def check_args(x, conv_weights, pool_weight, project_weight, bn_weights, bn_biases, running_means, running_vars,
               rates, training, momentum, eps, empty: bool = False, synchronized: bool = False) -> tuple[int, ...]:
    """Validate an aspp call; errors name the argument, its value and what was expected. Returns the rates.
    synchronized: the training statistics are shared by a process group, so this process may hold one image (its
    pooling branch's BatchNorm counts the group's images: nn.SyncBatchNorm's rule)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 4-D (N, C, H, W) tensor, got {shape}")
    if x.layout != torch.strided:
        refuse_layout("x", x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; expected float32, float64, float16 or bfloat16")
    # C-level maps decide the usual call (no frame, no name built); torch.compile traces the plain loops
    fast = not torch.compiler.is_compiling()
    if (type(rates) is not tuple or not fast or not all(map(operator.is_, map(type, rates), _REPEAT(int)))
            or (rates and min(rates) < 1)):
        rates = checked_rates(rates)
    if rates and max(rates) > INT32_MAX:  # kernels index with 32 bits; the op schema takes int64 at most
        raise ValueError(f"rates must be at most {INT32_MAX} (2**31 - 1), got {rates}")
    n, cin, h, w = x.shape
    if (n == 0 and not empty) or h == 0 or w == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    if not isinstance(conv_weights, (list, tuple)) or len(conv_weights) != len(rates) + 1:
        got = _describe(conv_weights)
        raise ValueError(f"conv_weights must be a list of {len(rates) + 1} tensors (the 1x1 branch, then one 3x3 per "
                         f"rate: rates={list(rates)}), got {got}")
    if not fast or not all(map(isinstance, conv_weights, _REPEAT(torch.Tensor))):
        for i, t in enumerate(conv_weights):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"conv_weights[{i}] must be a torch.Tensor, got {type(t).__name__}")
    if conv_weights[0].dim() != 4:
        raise ValueError(f"conv_weights[0] must be a 4-D weight (C, {cin}, 1, 1) (the 1x1 branch; C its output "
                         f"channels), got shape {tuple(conv_weights[0].shape)}")
    c = conv_weights[0].shape[0]
    for i, wt in enumerate(conv_weights):
        k = 1 if i == 0 else 3
        if tuple(wt.shape) != (c, cin, k, k):
            if {t.shape[1] for t in (*conv_weights, pool_weight) if isinstance(t, torch.Tensor) and t.dim() == 4} \
                    == {conv_weights[0].shape[1]}:  # the weights agree with each other: x is the odd one out
                check_x_channels(x, conv_weights[0], "the aspp op")
            raise ValueError(f"conv_weights[{i}] must have shape {(c, cin, k, k)}, got {tuple(wt.shape)}")
    if c < 1 or cin < 1:  # as conv_bn_relu: a convolution without channels is refused, not computed
        raise ValueError(f"conv_weights[0] shape {tuple(conv_weights[0].shape)} and x shape {tuple(x.shape)} must "
                         f"have no zero sizes in channels (C >= 1 output channels, C_in >= 1 input channels)")
    for name, t, shape in (("pool_weight", pool_weight, (c, cin, 1, 1)),
                           ("project_weight", project_weight, (c, (len(rates) + 2) * c, 1, 1))):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    weights = (pool_weight, project_weight, *conv_weights)
    if (fast and all(map(operator.is_, map(_LAYOUT, weights), _REPEAT(torch.strided)))
            and all(map(x.device.__eq__, map(_DEVICE, weights))) and all(map(operator.is_, map(_DTYPE, weights),
                                                                                _REPEAT(x.dtype)))):
        weights = ()  # (the usual call, decided by C-level maps: no names built)
    else:
        weights = [("pool_weight", pool_weight), ("project_weight", project_weight)] + [
            (f"conv_weights[{i}]", t) for i, t in enumerate(conv_weights)]
    for name, t in weights:
        if t.layout != torch.strided:
            refuse_layout(name, t)
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; expected the same device")
        if t.dtype != x.dtype:
            if all(w.dtype == t.dtype for w in (pool_weight, project_weight, *conv_weights)):  # x is the odd one out
                raise TypeError(f"x has dtype {x.dtype} but the weights (conv_weights, pool_weight, project_weight) "
                                f"have dtype {t.dtype}; expected the same dtype: convert x (x.to({t.dtype})) or the "
                                "weights (a module: .to(dtype)), or run under torch.autocast")
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; expected the same dtype")
    n_bn = len(rates) + 3
    given = {}
    channels = (c,)
    for name, value, allow_none in (("bn_weights", bn_weights, False), ("bn_biases", bn_biases, False),
                                    ("running_means", running_means, True), ("running_vars", running_vars, True)):
        # (a list of n_bn (C,) tensors, decided by C-level maps; anything else, or a bad one, by _check_bn)
        if (fast and type(value) in _LISTS and len(value) == n_bn and all(map(isinstance, value, _REPEAT(torch.Tensor)))
                and all(map(channels.__eq__, map(_SHAPE, value)))):
            given[name] = value if type(value) is Packed else list(value)
        else:
            given[name] = _check_bn(value, name, n_bn, c, allow_none=allow_none)
    allowed = (x.dtype, torch.float32) if x.dtype in HALF_DTYPES else (x.dtype,)
    dtypes = set()
    # Packed lists (one storage, one dtype, each contiguous: common.back_to_back): layout, device and dtype are those
    # of their first tensor; requires_grad is still each running statistic's own.
    packed = True
    for value in given.values():  # (a loop: no frame per call)
        if type(value) is not Packed or value.whole is None:
            packed = False
            break
    for name, value in given.items():
        if packed:
            if name.startswith("running_") and torch.is_grad_enabled() and any_requires_grad(value):
                refuse_running_grad(next(f"{name}[{i}]" for i, t in enumerate(value) if t.requires_grad))
            value = value[:1]
        single = isinstance(value, torch.Tensor)
        for i, t in enumerate([value] if single else value or []):
            # (the name, name[i], is built only for an error)
            if t.layout != torch.strided:
                refuse_layout(name if single else f"{name}[{i}]", t)
            if t.device != x.device:
                raise ValueError(f"{name if single else f'{name}[{i}]'} is on {t.device} but x is on {x.device}; "
                                 "expected the same device")
            if t.dtype not in allowed:
                raise TypeError(f"{name if single else f'{name}[{i}]'} has dtype {t.dtype}; expected "
                                + " or ".join(map(str, allowed)))
            if t.requires_grad and name.startswith("running_") and torch.is_grad_enabled():
                refuse_running_grad(name if single else f"{name}[{i}]")
            dtypes.add(t.dtype)
    if len(dtypes) > 1:
        raise TypeError(f"the BatchNorm tensors must share one dtype, got {sorted(map(str, dtypes))}")
    if (running_means is None) != (running_vars is None):
        raise ValueError("running_means and running_vars must be given together")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {training!r}")
    if not training and running_means is None:
        raise ValueError("training=False (eval) uses running statistics: running_means and running_vars are needed")
    if training and running_means is not None:  # (packed lists: checked as their joined views first)
        check_running_writable((("running_means", given["running_means"]), ("running_vars", given["running_vars"])),
                               (("bn_weights", given["bn_weights"]), ("bn_biases", given["bn_biases"])))
    if training and n == 1 and not synchronized:  # (an empty batch passes, as in torchvision's ASPP)
        raise ValueError(
            f"aspp in training mode needs a batch of 2 or more (got N={n}): the image-pooling branch has one value "
            "per channel and image, so its BatchNorm over a batch of 1 is undefined (PyTorch raises too). Use a "
            "batch of 2 or more, or eval mode / frozen BatchNorm (model.eval() on the BatchNorm layers)"
        )
    check_bn_numbers(momentum, eps)
    return rates


# ---- public functional -----------------------------------------------------------------------------


def _flat(value):
    """A BatchNorm argument as the ops take it: one concatenated tensor (a list is concatenated, per call)."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.cat(value)


class Packed(list):
    """A list of per-BatchNorm tensors whose back-to-back test (common.back_to_back) the caller made on this call
    (deeplab_ops.nn's fused ASPP, right after packing them): `whole` is the detached view of all of them, or None."""

    __slots__ = ("whole",)

    def __init__(self, ts, packed: bool) -> None:
        super().__init__(ts)
        # (inline: the fused ASPP builds four per call)
        self.whole = ts[0].detach().as_strided((ts[0].shape[0] * len(ts),), (1,)) if packed else None


_LISTS = (list, tuple, Packed)  # the argument types check_args's fast test takes (exactly: a subclass goes per tensor)


def _alias(value):
    """A BatchNorm argument as one tensor without a copy, or None: itself if it is one tensor (or None); for a list
    of (C,) tensors that lie back to back in one storage (what deeplab_ops.nn's fused ASPP keeps), a detached view
    of all of them; None for any other list (it needs a cat)."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    if type(value) is Packed:
        return value.whole
    if back_to_back(value):
        return Packed(value, True).whole
    return None


def _transform_backend(name: str, *args) -> str:
    """The backend of an aspp call inside a torch.func transform: reverse-mode transforms (grad, vjp, jacrev) and
    forward-mode AD on the op's tensors get conv_bn_relu's errors; under vmap, where a tensor is batched, the
    reference, whose aten ops batch (PyTorch has no batching fallback for an op with Tensor[] arguments)."""
    if name == "reference":  # differentiable and batchable by every transform
        return name
    tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else (a,)) if isinstance(t, Tensor)]
    refuse_grad_transforms("aspp", *tensors)
    refuse_forward_ad("aspp", *tensors)
    return "reference" if any(map(is_functorch_wrapped, tensors)) else name


def aspp(
    x: Tensor,
    conv_weights: list[Tensor],
    pool_weight: Tensor,
    project_weight: Tensor,
    bn_weights: list[Tensor] | Tensor,
    bn_biases: list[Tensor] | Tensor,
    running_means: list[Tensor] | Tensor | None,
    running_vars: list[Tensor] | Tensor | None,
    *,
    rates: tuple[int, ...],
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    backend: str | None = None,
    process_group=None,
    memory_efficient: bool = False,
) -> Tensor:
    """Fused ASPP (torchvision's structure, without the dropout after the projection).

    Args:
        x: (N, C_in, H, W), NCHW or channels_last. The output is channels_last where x or project_weight is (as
            torch's convolutions lay out torchvision's ASPP for an NCHW x), else NCHW.
        conv_weights: [1×1 branch (C, C_in, 1, 1), then one (C, C_in, 3, 3) per rate].
        pool_weight: the image-pooling branch's (C, C_in, 1, 1).
        project_weight: (C, (len(rates) + 2) * C, 1, 1).
        bn_weights, bn_biases, running_means, running_vars: every BatchNorm's (C,) tensors in the order
            [1×1 branch, one per rate, pooling, projection], either as a list of (C,) tensors or as one
            ((len(rates) + 3) * C,) tensor (no concatenation per call; what deeplab_ops.nn.FusedASPP keeps);
            running_* may be None (no running statistics). Training updates the running statistics in place as
            nn.BatchNorm2d does.
        rates: the atrous rates (dilation = padding) of the 3×3 branches.
        training, momentum, eps: as for every BatchNorm of the module (shared).
        backend: "cpu", "cuda", "triton", "reference", None for automatic choice ($DEEPLAB_OPS_BACKEND
            overrides None), or "auto" for automatic choice whatever $DEEPLAB_OPS_BACKEND says.
        process_group: a torch.distributed process group whose processes share BatchNorm statistics in training
            (nn.SyncBatchNorm semantics); None: no synchronization. The cpu and cuda backends synchronize; triton
            refuses (auto picks cuda).
        memory_efficient: keep no pre-BN activation for the backward (neither the conv branches' pre-BN outputs,
            N * (len(rates) + 1) * C * H * W values, nor the projection's pre-BN output): the backward recomputes
            them by one more forward of the op on the same backend. Same gradients and running statistics.
    """
    # Under torch.autocast the convolutions run in autocast's dtype, as eager conv2d does there (BatchNorm's tensors
    # as they are).
    amp = autocast_dtype(x) if torch._C._is_any_autocast_enabled() else None  # a C call when autocast is off
    if amp is not None:
        x, conv_weights = autocast_cast(x, amp), autocast_cast(conv_weights, amp)
        pool_weight, project_weight = autocast_cast(pool_weight, amp), autocast_cast(project_weight, amp)
    rates = check_args(x, conv_weights, pool_weight, project_weight, bn_weights, bn_biases, running_means,
                       running_vars, rates, training, momentum, eps, empty=True,
                       synchronized=training and process_group is not None)
    # channels_last where x or the projection's weight is, as torchvision's ASPP computes it (its cat with the
    # pooling branch, NCHW from a 1x1 map, is NCHW whatever the branches' weights)
    x = conv_layout(x, project_weight)
    if memory_efficient is not False and memory_efficient is not True:
        raise TypeError(f"memory_efficient must be a bool, got {memory_efficient!r}")
    group_name = group_name_of(process_group)  # checked in eval too (it synchronizes nothing there)
    if not training:
        group_name = None
    direct = enter_directly(x)  # not traced: Python caches (backend choice), views of packed BatchNorm tensors
    resolve = backends.resolve_remembered if direct else backends.resolve
    name = resolve(backend, "aspp", x.device, x=x, rates=rates, channels=conv_weights[0].shape[0],
                   synchronized=group_name is not None)
    if x.shape[0] == 0:  # (inline: no call per call) an empty batch runs on the reference, as eager computes it
        name = backend_for_batch(x, name, group_name)
    if not torch.compiler.is_compiling() and functorch_transform() is not None:  # inside a torch.func transform
        name = _transform_backend(name, x, conv_weights, pool_weight, project_weight, bn_weights, bn_biases,
                                  running_means, running_vars)
    if name == "reference":
        if group_name is not None:
            raise RuntimeError("deeplab_ops.aspp: backend='reference' has no synchronized BatchNorm (a "
                               "process_group in training); use backend='cpu' or 'cuda'")
        n_bn = len(rates) + 3
        # Under vmap, batch_norm's update does not reach a batched tensor through a view of it (_lists' chunks): one
        # running-statistic tensor is updated in per-BatchNorm copies (contiguous: a clone that keeps a batch
        # dimension other than the first is not written either), written back in one copy after the call.
        stats, back = [], []
        for v in (running_means, running_vars):
            parts = _lists(v, n_bn)
            if training and isinstance(v, torch.Tensor) and is_functorch_wrapped(v):
                parts = [t.clone(memory_format=torch.contiguous_format) for t in parts]
                back.append((v, parts))
            stats.append(parts)
        out = reference.aspp(x, conv_weights, pool_weight, project_weight, _lists(bn_weights, n_bn),
                             _lists(bn_biases, n_bn), *stats, rates=rates, training=training,
                             momentum=float(momentum), eps=float(eps))
        for v, parts in back:
            v.copy_(torch.cat(parts))
        return out
    args = [x, list(conv_weights), pool_weight, project_weight, bn_weights, bn_biases, running_means, running_vars,
            list(rates), training, float(momentum), float(eps), group_name, memory_efficient]
    if direct:
        if name == "cpu" and not training:
            _keep_branch_transforms(conv_weights)
        # Per-BatchNorm tensors back to back in one storage (deeplab_ops.nn's fused ASPP keeps them so) go in as
        # views of it, the per-BatchNorm parameters being the autograd inputs (their gradients come back as
        # views): no cat in forward or backward, one copy per running statistic.
        rm, rv = _alias(running_means), _alias(running_vars)
        parts = ()
        if not isinstance(bn_weights, torch.Tensor) and not isinstance(bn_biases, torch.Tensor):
            bw, bb = _alias(bn_weights), _alias(bn_biases)
            if bw is not None and bb is not None:
                args[4], args[5], parts = bw, bb, [*bn_weights, *bn_biases]  # a list: any_requires_grad sees it
        if not parts:
            args[4], args[5] = _flat(bn_weights), _flat(bn_biases)
        args[6] = _flat(running_means) if rm is None else rm
        args[7] = _flat(running_vars) if rv is None else rv
        if name == "triton":  # checked above: the twin skips its check
            out, *_, new_rm, new_rv = call_checked(_KERNELS[name], *args, bn_parts=parts)
        else:
            out, *_, new_rm, new_rv = _KERNELS[name](*args, bn_parts=parts)
    else:  # traced: the graph holds the op, which takes one tensor per BatchNorm argument
        rm, rv = (t if isinstance(t, torch.Tensor) else None for t in (running_means, running_vars))
        args[4:8] = _flat(bn_weights), _flat(bn_biases), _flat(running_means), _flat(running_vars)
        out, *_, new_rm, new_rv = FORWARD[name](*args)
    if training and running_means is not None:
        # A call that built a graph node (its output requires grad) wrote `whole` in its forward (_ASPP.forward).
        # (torch.jit.trace and torch.export record the copies always: their graph also runs where no node is built,
        # as under no_grad.)
        wrote = out.requires_grad and (direct or not graph_for_every_grad_mode())
        # Statistics made under torch.inference_mode() (a model built or loaded there) and updated outside it with no
        # graph (BatchNorm recalibration under no_grad) are written inside inference mode, which allows it: eager
        # F.batch_norm writes them inside its kernel, which inference mode does not police (not traced: no graph
        # break). With a graph, _ASPP.forward's write refuses them, as eager BatchNorm refuses to save them.
        inference = False
        if direct and not wrote:
            for value in (running_means, running_vars):
                for t in (value,) if isinstance(value, torch.Tensor) else value:
                    if t.is_inference():
                        inference = True
        # Each statistic in its own form: one tensor (or views of the caller's), or a list. Detached values, not a
        # no_grad block: torch.export saves one as a node its loader refuses.
        with torch.inference_mode() if inference else contextlib.nullcontext():
            for given, whole, new in ((running_means, rm, new_rm), (running_vars, rv, new_rv)):
                new = new.detach()
                if whole is not None:
                    if not wrote:
                        whole.copy_(new)
                else:
                    for t, part in zip(given, new.chunk(len(given)), strict=True):
                        t.copy_(part)
    return out


# ---- the triton twins' argument checks (deeplab_ops.triton.validate_with; see deeplab_ops/ops/conv_bn_relu.py) ---


def _direct_forward(x, conv_weights, pool_weight, project_weight, bn_weight, bn_bias, running_mean, running_var,
                    rates, training, momentum, eps, group_name=None, memory_efficient=False):
    check_args(x, list(conv_weights), pool_weight, project_weight, bn_weight, bn_bias, running_mean, running_var,
               list(rates), training, momentum, eps)
    _refuse_large("triton_aspp_forward", x, list(conv_weights), list(rates))


def _refuse_large(op: str, x, conv_weights, rates) -> None:
    c = conv_weights[0].shape[0]
    backends.refuse_beyond_kernel_limits(op, backends.aspp_largest(x, rates, c), backends.aspp_reach(x, rates),
                                         backends.aspp_grid_y(x, rates, c))


def _direct_backward(grad_out, x, conv_weights, pool_weight, project_weight, bn_weight, bn_bias, branch_out,
                     pool_out, project_out, out, save_mean, save_invstd, rates, training, output_mask,
                     group_name=None):
    conv_weights, rates = list(conv_weights), list(rates)
    if conv_weights and isinstance(conv_weights[0], torch.Tensor) and conv_weights[0].dim() == 4:
        for name, t in (("save_mean", save_mean), ("save_invstd", save_invstd)):
            _check_bn(t, name, len(rates) + 3, conv_weights[0].shape[0])
    # the saved statistics stand where the running ones would: one tensor of (len(rates) + 3) * C values each
    check_args(x, conv_weights, pool_weight, project_weight, bn_weight, bn_bias, save_mean, save_invstd, rates,
               training, 0.1, 1e-5)
    n, _, h, w = x.shape
    c = conv_weights[0].shape[0]
    if not isinstance(branch_out, (list, tuple)) or len(branch_out) != 1:
        got = f"{type(branch_out).__name__} of length {len(branch_out)}" if isinstance(branch_out, (list, tuple)) \
            else type(branch_out).__name__
        raise ValueError(f"branch_out must be the triton forward's list of one buffer (N, B*C, H, W), got {got}")
    for name, t, shape in (("grad_out", grad_out, (n, c, h, w)), ("project_out", project_out, (n, c, h, w)),
                           ("out", out, (n, c, h, w)),
                           ("branch_out[0]", branch_out[0], (n, len(conv_weights) * c, h, w)),
                           ("pool_out", pool_out, (n, c))):
        if not isinstance(t, torch.Tensor) or t.shape != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must have shape {shape} (the forward's), got {got}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; expected the same device")
    if len(output_mask) != 3:
        raise ValueError(f"output_mask must have 3 values (x, weights, BatchNorm parameters), got {list(output_mask)}")
    _refuse_large("triton_aspp_backward", x, conv_weights, rates)


validate_with("triton_aspp_forward", _direct_forward)
validate_with("triton_aspp_backward", _direct_backward)


def _keep_branch_transforms(conv_weights) -> None:
    """Registers the 3×3 branch weights of a cpu-backend eval call as weights whose Winograd transforms the backend
    may keep (csrc/cpu/winograd_cpu.h), as the eval path of conv_bn_relu keeps its cached folds': kept per weight
    tensor, storage and version counter, so an optimizer step or load_state_dict refreshes them and, as for the
    folds, a write through `.data` is not seen (deeplab_ops.common.clear_derived() drops them). Without it, a
    2048 → 256 branch would be transformed (52 MB) on every call, which costs more than Winograd saves there.
    Parameters only: a weight computed per call (a scaled or reparametrized one) is never seen again, and registered
    it would make the plan count its transform as kept and leave a dead transform in the cache."""
    for w in conv_weights[1:]:
        if isinstance(w, torch.nn.Parameter) and w.device.type == "cpu" and w.dtype == torch.float32:
            torch.ops.deeplab_ops.winograd_cache_allow(w)


def _lists(value, n_bn: int):
    """A BatchNorm argument as per-BatchNorm tensors: views of a concatenated tensor (in-place updates reach it)."""
    return list(value.chunk(n_bn)) if isinstance(value, torch.Tensor) else value

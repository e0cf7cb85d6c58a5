"""conv_bn_relu: argument checks, fake kernels, the eval fold, the public function. Schemas in csrc/ops.cpp
(`conv_bn_relu_forward/_backward` for cpu and cuda, `triton_` twins for triton); the one autograd, shared by the
twins, in csrc/composite/conv_bn_relu_autograd.cpp. The forward is functional (returns the new running statistics,
which the front door copies into the caller's buffers).
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as _forward_ad

from deeplab_ops import backends, reference
from deeplab_ops.common import (
    FLOAT_DTYPES,
    HALF_DTYPES,
    INT32_MAX,
    autocast_cast,
    autocast_dtype,
    cached_derived,
    check_bn_numbers,
    check_running_writable,
    conv_layout,
    conv_output_size,
    derived,
    drop_oldest,
    empty_activation,
    fake_mode,
    graph_for_every_grad_mode,
    jit_tracing,
    opmath_dtype,
    pair,
    refuse_layout,
    refuse_running_grad,
)
from deeplab_ops.ops.dispatch import (
    BELOW_AUTOGRAD,
    backend_for_batch,
    conv_flops,
    enter_directly,
    group_name_of,
    refuse_forward_ad,
    refuse_grad_transforms,
    register_double_backward_refusal,
    register_fake,
    register_flops,
)
from deeplab_ops.triton import call_checked, validate_with

Tensor = torch.Tensor
_ops = torch.ops.deeplab_ops

FORWARD = {"cpu": _ops.conv_bn_relu_forward.default, "cuda": _ops.conv_bn_relu_forward.default,
           "triton": _ops.triton_conv_bn_relu_forward.default}
# act(conv(x, w) + bias [+ residual]): the eval forward with BatchNorm folded into (w, bias), and (no bias, no
# activation) the plain convolution that the memory-efficient backward recomputes.
CONV_BIAS_ACT = {"cpu": _ops.conv_bias_act.default, "cuda": _ops.conv_bias_act.default,
                 "triton": _ops.triton_conv_bias_act.default}
# The forward's `out` in eval and nothing else: the eval path of the dtypes not folded (FOLDED_DTYPES).
EVAL = {"cpu": _ops.conv_bn_relu_eval.default, "cuda": _ops.conv_bn_relu_eval.default,
        "triton": _ops.triton_conv_bn_relu_eval.default}


# ---- argument checks ------------------------------------------------------------------------------


def _check_config(stride, padding, dilation, training, momentum, eps, relu) -> tuple:
    """The call's fixed configuration, validated: (stride, padding, dilation) as pairs."""
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    if min(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if min(dilation) < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    if min(padding) < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    for name, value in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if max(value) > INT32_MAX:  # kernels index with 32 bits; the op schema takes int64 at most
            raise ValueError(f"{name} must be at most {INT32_MAX} (2**31 - 1), got {value}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {training!r}")
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {relu!r}")
    check_bn_numbers(momentum, eps)
    return stride, padding, dilation


# Configurations already validated: (stride, padding, dilation, training, momentum, eps, relu) -> pairs. A module
# calls with the same few configurations every step, so each is checked once. At most _MAX_CONFIGS, the oldest
# dropped first: a training BatchNorm with momentum=None brings a new momentum (1 / (n + 1)) every step, which must
# neither grow the cache without bound nor fill it for good (every configuration first seen afterwards, a new model's
# in a sweep, would then be checked on every call).
_CONFIGS: dict[tuple, tuple] = {}
_MAX_CONFIGS = 4096
_NUMBER_TYPES = (float, int)


def checked_config(stride, padding, dilation, training, momentum, eps, relu) -> tuple:
    """The call's (stride, padding, dilation) as pairs, each distinct configuration validated once. Cached only when
    every value has an exact type: equal keys must mean equal configurations (1 == True == 1.0 would otherwise let
    relu=1 pass as relu=True, or stride=1.0 as stride=1)."""
    exact = (type(training) is bool and type(relu) is bool and type(momentum) in _NUMBER_TYPES
             and type(eps) in _NUMBER_TYPES)
    for v in (stride, padding, dilation):  # each an int or a pair of ints (inline: every eval call asks)
        t = type(v)
        if not (t is int or (t is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int)):
            exact = False
    if exact and torch.compiler.is_compiling():  # a traced graph reads no Python cache (it would guard on it)
        exact = False
    if exact:
        key = (stride, padding, dilation, training, momentum, eps, relu)
        geometry = _CONFIGS.get(key)
        if geometry is not None:
            return geometry
    geometry = _check_config(stride, padding, dilation, training, momentum, eps, relu)
    if exact:
        if len(_CONFIGS) >= _MAX_CONFIGS:
            drop_oldest(_CONFIGS)
        _CONFIGS[key] = geometry
    return geometry


def _check_vector(t, name: str, cout: int, device, dtype, bn_dtype):
    """A BatchNorm tensor's checks (one value per output channel, x's device, an allowed dtype shared by the
    other BatchNorm tensors); returns its dtype."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        refuse_layout(name, t)
    shape = t.shape
    if len(shape) != 1 or shape[0] != cout:
        raise ValueError(f"{name} must have shape ({cout},) (one value per output channel), got {tuple(shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; expected the same device")
    t_dtype = t.dtype
    if t_dtype != dtype and not (dtype in HALF_DTYPES and t_dtype == torch.float32):
        allowed = (dtype, torch.float32) if dtype in HALF_DTYPES else (dtype,)
        raise TypeError(
            f"{name} has dtype {t_dtype} but x has dtype {dtype}; expected " + " or ".join(map(str, allowed))
        )
    if bn_dtype is not None and t_dtype != bn_dtype:
        raise TypeError(f"{name} has dtype {t_dtype} but the other BatchNorm tensors have {bn_dtype}")
    return t_dtype


def check_conv(x, weight, stride, padding, dilation, empty: bool = False) -> tuple[int, int, int, int]:
    """x and weight of a convolution with this (already checked) geometry: tensors of the right ranks, dtype,
    device and channels, a non-empty output; returns the output's shape (N, C_out, H_out, W_out)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if x.layout != torch.strided or weight.layout != torch.strided:
        refuse_layout(*(("x", x) if x.layout != torch.strided else ("weight", weight)))
    xshape, wshape = x.shape, weight.shape
    if len(xshape) != 4:
        raise ValueError(f"x must be a 4-D (N, C, H, W) tensor, got shape {tuple(xshape)}")
    dtype = x.dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"x has dtype {dtype}; expected one of float32, float64, float16, bfloat16")
    if len(wshape) != 4:
        raise ValueError(f"weight must be a 4-D (C_out, C_in, kH, kW) tensor, got shape {tuple(wshape)}")
    device = x.device
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but x is on {device}; expected the same device")
    if weight.dtype != dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x has dtype {dtype}; expected the same dtype")
    n, cin, h, w = xshape
    cout, wcin, kh, kw = wshape
    if wcin != cin:
        if wcin > 0 and cin % wcin == 0 and cin != wcin:
            raise ValueError(
                f"weight has shape {tuple(wshape)}: {wcin} input channels for x's {cin} looks like a grouped "
                f"convolution (groups={cin // wcin}); only groups=1 is supported, so weight.shape[1] must be {cin}"
            )
        raise ValueError(f"weight.shape[1]={wcin} does not match x's {cin} channels (x shape {tuple(xshape)})")
    if cout < 1 or kh < 1 or kw < 1 or cin < 1:
        raise ValueError(f"weight shape {tuple(wshape)} and x shape {tuple(xshape)} must have no zero sizes "
                         f"in channels and kernel")
    if n == 0 and not empty:
        raise ValueError(f"x has an empty batch (shape {tuple(xshape)}); expected N >= 1")
    if (h < 1 or w < 1) and n:  # (padding could make the output non-empty: a convolution of nothing, which eager
        # refuses but for an empty batch, as the op, which computes that without its kernels)
        raise ValueError(f"x has an empty spatial size (shape {tuple(xshape)}); expected H >= 1 and W >= 1")
    ho, wo = conv_output_size((h, w), (kh, kw), stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(
            f"the output would be {ho}x{wo}: x is {h}x{w} with kernel {kh}x{kw}, stride {stride}, padding {padding}, "
            f"dilation {dilation}; expected an output of at least 1x1 (pad more or use a larger input)"
        )
    return n, cout, ho, wo


def check_args(
    x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, training, momentum, eps,
    residual, relu, empty: bool = False, synchronized: bool = False,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Validate a conv_bn_relu call; return (stride, padding, dilation) as pairs. Errors name the argument.
    Per call only what can change per call is checked (tensor kinds, shapes, dtypes, devices): the fixed
    configuration is validated once (`checked_config`). empty: an empty batch (N = 0) is valid (the public op
    computes it as eager does; the kernels' direct entries refuse it). synchronized: the training statistics are
    shared by a process group, so this process may hold a single value per channel (nn.SyncBatchNorm's rule)."""
    geometry = checked_config(stride, padding, dilation, training, momentum, eps, relu)
    n, cout, ho, wo = check_conv(x, weight, *geometry, empty=empty)
    device, dtype = x.device, x.dtype
    if _plain_bn(bn_weight, bn_bias, running_mean, running_var, cout, device, dtype, training):
        if (running_mean.requires_grad or running_var.requires_grad) and torch.is_grad_enabled():
            refuse_running_grad("running_mean" if running_mean.requires_grad else "running_var")
    else:  # the per-tensor checks: they decide the unusual calls and name what is wrong
        _check_bn(bn_weight, bn_bias, running_mean, running_var, cout, device, dtype, training)
    if training and n * ho * wo == 1 and not synchronized:  # (F.batch_norm's rule: an empty batch passes)
        raise ValueError(
            f"training BatchNorm needs more than 1 value per channel, but the output is {n}x{cout}x{ho}x{wo}; "
            "use a batch of 2 or more (or a larger input), or training=False with running statistics"
        )
    if residual is not None and not (isinstance(residual, Tensor) and residual.shape == (n, cout, ho, wo)
                                     and residual.device == device and residual.dtype == dtype
                                     and residual.layout == torch.strided):
        _check_like_output(residual, "residual", (n, cout, ho, wo), x)  # which of them, said (no frame per call)
    return geometry


def _plain_bn(bn_weight, bn_bias, running_mean, running_var, cout: int, device, dtype, training: bool) -> bool:
    """The usual call's BatchNorm tensors, passed in one sweep (check_args' per-call cost): four (cout,) unit-stride
    strided vectors of one allowed dtype on x's device and, in training, running statistics whose bytes meet neither
    each other's nor the affine parameters' (common.check_running_writable's rule, for four equal-length spans: apart
    by at least their length). Never raises: False sends the call to `_check_bn`, which decides anything else (and
    names what is wrong)."""
    if cout < 1 or device.type == "meta" or not isinstance(bn_weight, Tensor):
        return False
    bn_dtype = bn_weight.dtype
    if bn_dtype is not dtype and not (bn_dtype is torch.float32 and dtype in HALF_DTYPES):
        return False
    for t in (bn_weight, bn_bias, running_mean, running_var):
        if (not isinstance(t, Tensor) or t.layout is not torch.strided or t.shape != (cout,) or t.dtype is not bn_dtype
                or t.device != device or t.stride() != (1,)):
            return False
    if not training:
        return True
    if torch.compiler.is_compiling() or fake_mode() is not None:  # (fake tensors: strides, no addresses)
        return False
    try:
        a, b, m, v = bn_weight.data_ptr(), bn_bias.data_ptr(), running_mean.data_ptr(), running_var.data_ptr()
    except RuntimeError:  # (no storage: torch.func's wrappers)
        return False
    n = cout * bn_weight.element_size()
    return abs(m - v) >= n and abs(m - a) >= n and abs(m - b) >= n and abs(v - a) >= n and abs(v - b) >= n


def _check_bn(bn_weight, bn_bias, running_mean, running_var, cout: int, device, dtype, training: bool) -> None:
    """check_args' BatchNorm tensors one by one (what `_plain_bn` did not pass); errors name the argument."""
    bn_dtype = None
    if bn_weight is not None:
        bn_dtype = _check_vector(bn_weight, "bn_weight", cout, device, dtype, bn_dtype)
    if bn_bias is not None:
        bn_dtype = _check_vector(bn_bias, "bn_bias", cout, device, dtype, bn_dtype)
    if running_mean is not None:
        bn_dtype = _check_vector(running_mean, "running_mean", cout, device, dtype, bn_dtype)
    if running_var is not None:
        _check_vector(running_var, "running_var", cout, device, dtype, bn_dtype)
    if (running_mean is None) != (running_var is None):
        given = "running_mean" if running_var is None else "running_var"
        raise ValueError(f"running_mean and running_var must be given together; only {given} was given")
    if not training and running_mean is None:
        raise ValueError("training=False (eval) uses running statistics: running_mean and running_var must be given")
    if (running_mean is not None and (running_mean.requires_grad or running_var.requires_grad)
            and torch.is_grad_enabled()):
        refuse_running_grad("running_mean" if running_mean.requires_grad else "running_var")
    if training and running_mean is not None:
        check_running_writable((("running_mean", running_mean), ("running_var", running_var)),
                               (("bn_weight", bn_weight), ("bn_bias", bn_bias)))


def _check_like_output(t, name: str, shape: tuple, x: Tensor) -> None:
    """A tensor of the convolution output's shape, on x's device, in x's dtype."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        refuse_layout(name, t)
    if t.shape != shape:
        raise ValueError(f"{name} must have the output's shape {shape}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; expected the same device")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; expected the same dtype")


# ---- the triton twins' argument checks (deeplab_ops.triton.validate_with) -----------------------------------
# The C++ ops check their arguments in C++; the triton twins run Python kernels, which would read out of bounds on a
# GPU for inconsistent shapes: a call that reaches them, directly (torch.ops.deeplab_ops.triton_*) or not, is
# checked with the front door's rules (the forward's checks, the saved tensors' shapes for the backward).


def _direct_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, training,
                    momentum, eps, residual, relu, group_name=None, memory_efficient=False):
    geometry = check_args(x, weight, bn_weight, bn_bias, running_mean, running_var, tuple(stride), tuple(padding),
                          tuple(dilation), training, momentum, eps, residual, relu)
    _refuse_large("triton_conv_bn_relu_forward", x, weight, check_conv(x, weight, *geometry), geometry)


def _refuse_large(op: str, x, weight, shape, geometry) -> None:
    backends.refuse_beyond_kernel_limits(op, backends.conv_largest(x, weight, math.prod(shape)),
                                         backends.conv_reach(x, weight, *geometry), backends.conv_grid_y(x, weight))


def _direct_backward(grad_out, x, weight, bn_weight, conv_out, out, save_mean, save_invstd, stride, padding,
                     dilation, training, relu, output_mask, group_name=None):
    geometry = checked_config(tuple(stride), tuple(padding), tuple(dilation), training, 0.1, 1e-5, relu)
    shape = check_conv(x, weight, *geometry)
    for name, t in (("bn_weight", bn_weight), ("save_mean", save_mean), ("save_invstd", save_invstd)):
        if t is not None or name != "bn_weight":
            _check_vector(t, name, shape[1], x.device, x.dtype, None)
    for name, t in (("grad_out", grad_out), ("conv_out", conv_out), ("out", out)):
        _check_like_output(t, name, shape, x)
    if len(output_mask) != 5:
        raise ValueError(f"output_mask must have 5 values (x, weight, bn_weight, bn_bias, residual), got "
                         f"{list(output_mask)}")
    _refuse_large("triton_conv_bn_relu_backward", x, weight, shape, geometry)


def _direct_conv_bias_act(x, weight, bias, residual, stride, padding, dilation, relu):
    geometry = checked_config(tuple(stride), tuple(padding), tuple(dilation), False, 0.1, 1e-5, relu)
    shape = check_conv(x, weight, *geometry)
    if bias is not None:
        _check_vector(bias, "bias", shape[1], x.device, x.dtype, None)
        if bias.dtype != x.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but x has dtype {x.dtype}; expected the same dtype")
    if residual is not None:
        _check_like_output(residual, "residual", shape, x)
    _refuse_large("triton_conv_bias_act", x, weight, shape, geometry)


def _direct_eval(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, eps, residual,
                 relu):
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if not isinstance(t, Tensor):  # the schema's Tensor (not Tensor?): never None
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    geometry = check_args(x, weight, bn_weight, bn_bias, running_mean, running_var, tuple(stride), tuple(padding),
                          tuple(dilation), False, 0.1, eps, residual, relu)
    _refuse_large("triton_conv_bn_relu_eval", x, weight, check_conv(x, weight, *geometry), geometry)


validate_with("triton_conv_bn_relu_forward", _direct_forward)
validate_with("triton_conv_bn_relu_eval", _direct_eval)
validate_with("triton_conv_bn_relu_backward", _direct_backward)
validate_with("triton_conv_bias_act", _direct_conv_bias_act)


# ---- fake kernels ----------------------------------------------------------------------------------


def _fake_devices(x, **tensors) -> None:
    """A fake kernel is also the Meta kernel: a meta tensor beside real ones would reach it and get an
    uninitialized output back. Every tensor on x's device, as the real kernels require."""
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; expected the same device")


def _forward_fake(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, training,
                  momentum, eps, residual, relu, group_name=None, memory_efficient=False):
    _fake_devices(x, weight=weight, bn_weight=bn_weight, bn_bias=bn_bias, running_mean=running_mean,
                  running_var=running_var, residual=residual)
    ho, wo = conv_output_size(tuple(x.shape[2:]), tuple(weight.shape[2:]), stride, padding, dilation)
    shape = (x.shape[0], weight.shape[0], ho, wo)
    stat = opmath_dtype(x.dtype)
    c = weight.shape[0]
    updates = training and running_mean is not None
    rdt = running_mean.dtype if running_mean is not None else stat
    return (empty_activation(x, shape), empty_activation(x, shape), x.new_empty((c,), dtype=stat),
            x.new_empty((c,), dtype=stat), x.new_empty((c if updates else 0,), dtype=rdt),
            x.new_empty((c if updates else 0,), dtype=rdt))


def _triton_forward_fake(*args, **kwargs):
    # The triton twin returns conv_out channels_last whatever x's format: only its backward reads it, as NHWC.
    out, conv_out, *rest = _forward_fake(*args, **kwargs)
    return (out, empty_activation(conv_out, memory_format=torch.channels_last), *rest)


def _backward_fake(grad_out, x, weight, bn_weight, conv_out, out, save_mean, save_invstd, stride, padding, dilation,
                   training, relu, output_mask, group_name=None):
    # The kernels return each gradient dense in its tensor's memory format (NCHW or channels_last), whatever the
    # tensor's own strides (transposed, expanded, a slice): empty_like(x) would predict those strides instead.
    c = weight.shape[0]
    return (
        empty_activation(x) if output_mask[0] else None,
        empty_activation(weight) if output_mask[1] else None,
        save_mean.new_empty((c,)) if output_mask[2] else None,
        save_mean.new_empty((c,)) if output_mask[3] else None,
        empty_activation(conv_out) if output_mask[4] else None,
    )


def _triton_backward_fake(grad_out, x, weight, bn_weight, conv_out, out, *args, **kwargs):
    # The triton twin returns grad_residual in x's memory format (its conv_out is channels_last whatever x's).
    *grads, grad_res = _backward_fake(grad_out, x, weight, bn_weight, conv_out, out, *args, **kwargs)
    if grad_res is not None:
        grad_res = empty_activation(x, tuple(conv_out.shape), dtype=conv_out.dtype)
    return (*grads, grad_res)


def _conv_bias_act_fake(x, weight, bias, residual, stride, padding, dilation, relu):
    _fake_devices(x, weight=weight, bias=bias, residual=residual)
    ho, wo = conv_output_size(tuple(x.shape[2:]), tuple(weight.shape[2:]), stride, padding, dilation)
    return empty_activation(x, (x.shape[0], weight.shape[0], ho, wo))


def _triton_conv_bias_act_fake(x, weight, bias, residual, stride, padding, dilation, relu):
    # The plain convolution (no bias, residual or ReLU) is the training forward's conv_out: channels_last there.
    out = _conv_bias_act_fake(x, weight, bias, residual, stride, padding, dilation, relu)
    if bias is None and residual is None and not relu:
        return empty_activation(out, memory_format=torch.channels_last)
    return out


def _eval_fake(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, eps, residual,
               relu):
    _fake_devices(x, bn_weight=bn_weight, bn_bias=bn_bias, running_mean=running_mean, running_var=running_var)
    return _conv_bias_act_fake(x, weight, None, residual, stride, padding, dilation, relu)


# ---- autograd: one implementation for both twins ------------------------------------------------------
#
# In C++ (csrc/composite/conv_bn_relu_autograd.cpp, the Autograd kernel of conv_bn_relu_forward and of its triton_
# twin): a network calls this op once per layer, and a Python autograd.Function cost as much host time as a small
# layer's kernels. Here only the backward ops' Autograd kernels, which refuse double backward.

_DOUBLE_BACKWARD = ("deeplab_ops.conv_bn_relu does not support double backward (a gradient of its gradient, as "
                    "with create_graph=True); use backend='reference' for higher-order gradients")

for _prefix, _fwd_fake, _bwd_fake, _cba_fake in (
        ("", _forward_fake, _backward_fake, _conv_bias_act_fake),
        ("triton_", _triton_forward_fake, _triton_backward_fake, _triton_conv_bias_act_fake)):
    register_fake(f"deeplab_ops::{_prefix}conv_bn_relu_forward")(_fwd_fake)
    register_fake(f"deeplab_ops::{_prefix}conv_bn_relu_backward")(_bwd_fake)
    register_fake(f"deeplab_ops::{_prefix}conv_bias_act")(_cba_fake)
    register_fake(f"deeplab_ops::{_prefix}conv_bn_relu_eval")(_eval_fake)
register_double_backward_refusal("conv_bn_relu", _DOUBLE_BACKWARD)


def _per_member(op, info, in_dims, args):
    """One call of `op` per vmapped slice, the outputs stacked (None outputs stay None): what PyTorch's per-sample
    fallback computes, without its warning on every call ("performance drop ... batching rule for deeplab_ops::")."""
    # (an int[] argument has a list of Nones for its dims)
    outs = [op(*[a.select(d, i) if isinstance(d, int) else a for a, d in zip(args, in_dims, strict=True)])
            for i in range(info.batch_size)]
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs), 0
    stacked = tuple(None if parts[0] is None else torch.stack(parts) for parts in zip(*outs, strict=True))
    return stacked, tuple(None if t is None else 0 for t in stacked)


def _per_member_vmap(op):
    """torch.vmap's rule for the training forward (each vmapped slice has its own batch statistics), its backward
    and the half-dtype eval op (kept simple: one call per slice there too)."""
    return lambda info, in_dims, *args: _per_member(op, info, in_dims, args)


def _conv_bias_act_vmap(op):
    """torch.vmap's rule for the eval fold's op (a fused model in eval with nothing to differentiate, under vmap):
    with the weight and bias shared, the vmapped dimension folds into the batch (one call); with batched weights (an
    ensemble: stack_module_state + functional_call) one call per member."""
    def rule(info, in_dims, *args):
        x_dim, w_dim, b_dim, r_dim = in_dims[:4]
        if w_dim is not None or b_dim is not None:
            return _per_member(op, info, in_dims, args)
        x, weight, bias, residual, *geometry = args
        size = info.batch_size

        def flat(t, dim):  # (B, N, C, H, W) -> (B * N, C, H, W)
            t = t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)
            return t.reshape(size * t.shape[1], *t.shape[2:])

        out = op(flat(x, x_dim), weight, bias, None if residual is None else flat(residual, r_dim), *geometry)
        return out.reshape(size, out.shape[0] // size, *out.shape[1:]), 0
    return rule


if hasattr(torch.library, "register_vmap"):  # (torch >= 2.5; before, the per-sample fallback)
    for _prefix in ("", "triton_"):
        _op = getattr(_ops, f"{_prefix}conv_bias_act").default
        torch.library.register_vmap(_op, _conv_bias_act_vmap(_op))
        for _name in ("conv_bn_relu_forward", "conv_bn_relu_backward", "conv_bn_relu_eval"):
            _op = getattr(_ops, f"{_prefix}{_name}").default
            torch.library.register_vmap(_op, _per_member_vmap(_op))


# ---- FLOP counts (torch.utils.flop_counter; tensors arrive as their shapes) --------------------------------------

def _forward_flops(x, weight, *args, out_shape, **kwargs) -> int:
    return conv_flops(x, weight, out_shape[0])


def _single_output_flops(x, weight, *args, out_shape, **kwargs) -> int:
    return conv_flops(x, weight, out_shape)


def _backward_flops(grad_out, x, weight, bn_weight, conv_out, out, save_mean, save_invstd, stride, padding, dilation,
                    training, relu, output_mask, *args, out_shape, **kwargs) -> int:
    # the input gradient and the weight gradient each cost the forward's products (aten.convolution_backward's count)
    return conv_flops(x, weight, grad_out) * (bool(output_mask[0]) + bool(output_mask[1]))


for _prefix in ("", "triton_"):
    register_flops([f"{_prefix}conv_bn_relu_forward"], _forward_flops)
    register_flops([f"{_prefix}conv_bias_act", f"{_prefix}conv_bn_relu_eval"], _single_output_flops)
    register_flops([f"{_prefix}conv_bn_relu_backward"], _backward_flops)


# ---- eval: BatchNorm folded into the convolution ---------------------------------------------------


def _fold(weight: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None, running_mean: Tensor,
          running_var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(w * s, beta - mean * s) with s = gamma / sqrt(var + eps): eval BatchNorm as the conv's weight and bias.
    Computed in the opmath dtype, stored in the weight's dtype and memory format."""
    stat = opmath_dtype(weight.dtype)
    scale = (running_var.to(stat) + eps).rsqrt()
    if bn_weight is not None:
        scale = scale * bn_weight.to(stat)
    shift = -running_mean.to(stat) * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(stat)
    folded = (weight.to(stat) * scale.view(-1, 1, 1, 1)).to(weight.dtype)
    return folded.contiguous(memory_format=torch._prims_common.suggest_memory_format(weight)), shift.to(weight.dtype)


def _keep_transforms(folded: tuple[Tensor, Tensor]) -> None:
    """A cached fold's weight, which nothing writes in place, may have its Winograd transform kept by the cpu
    backend (csrc/cpu/winograd_cpu.h); other weights (parameters, a compiled graph's reused buffers) may not."""
    if folded[0].device.type == "cpu":
        torch.ops.deeplab_ops.winograd_cache_allow(folded[0])


# Dtypes whose eval folds BatchNorm into the convolution. In float16/bfloat16 the folded weight w·γ/√(var+ε) would be
# rounded to the half dtype: one rounding of every product w·x more than eager's conv → BatchNorm (whose weight is
# the parameter itself, exact), which is as large as the output where a filter's terms cancel (a 14× larger error
# than eager's on mean-100 inputs; 2.5–3× on image-like ones). Half eval runs conv_bn_relu_eval instead: the
# convolution in the half dtype, BatchNorm from the running statistics in float32, as eager rounds.
FOLDED_DTYPES = (torch.float32, torch.float64)


def _eval_unfolded(name, cached, x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
                   eps, residual, relu):
    """Eval with nothing to differentiate in a dtype not folded: EVAL (no conv_out, statistics or running-statistic
    outputs; triton stores the output alone). `cached`: a direct call with the parameters themselves (no autocast
    cast), validated by the full path: marks them validated for eval_fast, as a cached fold does."""
    args = (x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, eps, residual, relu)
    if not cached:  # traced, or a weight cast per call
        return EVAL[name](*args)
    derived(("eval", eps), (weight, bn_weight, bn_bias, running_mean, running_var), _validation_mark)
    with BELOW_AUTOGRAD():  # nothing to differentiate: skip the Autograd key's fallback
        if name == "triton":  # checked by the caller: the twin skips its check
            return call_checked(EVAL[name], *args)
        return EVAL[name](*args)


def _validation_mark() -> bool:
    """The value cached for eval parameters that are not folded: only that they passed the full path's checks."""
    return True


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---- the eval fast path ----------------------------------------------------------------------------


def eval_fast(x, weight, bn_weight, bn_bias, running_mean, running_var, geometry, eps, residual, relu, backend):
    """An eval call with nothing to differentiate, run with only the checks its arguments can fail per call, or None
    where the full path must run (it checks everything, folds, caches the fold and raises the errors).

    It runs when the fold of exactly these parameter tensors, in their current state, is cached: the full path
    folded them after validating them (shapes, dtypes, devices) against an x of the weight's dtype and device, and
    they are unchanged since, so they are still valid for any x that passes the checks here (4-D, the weight's
    dtype, device and input channels, a non-empty batch, an output of at least 1x1; the residual's shape, dtype and
    device). In the dtypes not folded (FOLDED_DTYPES) the full path caches a mark of that validation instead, under
    the same key, and this runs conv_bn_relu_eval. `geometry`: validated (stride, padding, dilation) pairs; eps: a
    validated float. Callers check enter_directly(x) first (not traced, a plain tensor). Each layer of a fused network
    in eval runs this: about 5 us of Python on top of the op here, where the full path took about 25."""
    if _forward_ad._current_level >= 0:  # forward-mode AD: the full path refuses it
        return None
    xshape, wshape = x.shape, weight.shape
    if (len(xshape) != 4 or len(wshape) != 4 or x.dtype != weight.dtype or x.device != weight.device
            or xshape[1] != wshape[1] or x.layout != torch.strided):
        return None
    n = xshape[0]
    stride, padding, dilation = geometry
    ho, wo = conv_output_size(xshape[2:], wshape[2:], stride, padding, dilation)
    if n < 1 or ho < 1 or wo < 1:
        return None
    if residual is not None and (type(residual) is not Tensor or residual.shape != (n, wshape[0], ho, wo)
                                 or residual.dtype != x.dtype or residual.device != x.device
                                 or residual.layout != torch.strided):
        return None
    folds = weight.dtype in FOLDED_DTYPES
    folded = cached_derived(("fold", eps) if folds else ("eval", eps),
                            (weight, bn_weight, bn_bias, running_mean, running_var))
    if folded is None:  # a hit also means the BatchNorm tensors are the tensors validated before
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bn_weight is not None and bn_weight.requires_grad)
                                    or (bn_bias is not None and bn_bias.requires_grad)
                                    or (residual is not None and residual.requires_grad)
                                    or running_mean.requires_grad or running_var.requires_grad):  # (refused there)
        return None
    name = backends.resolve_remembered(backend, "conv_bn_relu", x.device, False, x=x, weight=weight, stride=stride,
                                       padding=padding, dilation=dilation)
    if name == "reference":
        return None
    if folds:
        op, args = CONV_BIAS_ACT[name], (x, folded[0], folded[1], residual, stride, padding, dilation, relu)
    else:
        op, args = EVAL[name], (x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
                                eps, residual, relu)
    with BELOW_AUTOGRAD():  # nothing to differentiate: skip the Autograd key's fallback
        if name == "triton":  # checked here and by the full path that cached the fold: the twin skips its check
            return call_checked(op, *args)
        return op(*args)


# ---- public functional -----------------------------------------------------------------------------


def conv_bn_relu(
    x: Tensor,
    weight: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Tensor | None = None,
    relu: bool = True,
    backend: str | None = None,
    process_group=None,
    memory_efficient: bool = False,
) -> Tensor:
    """Fused `act(BatchNorm(conv2d(x, weight)) [+ residual])`, act = ReLU (or identity with relu=False).

    Computes what ``F.conv2d(x, weight, None, stride, padding, dilation)`` → ``F.batch_norm(..., training,
    momentum, eps)`` → ``+ residual`` → ``F.relu`` compute, with groups=1 and no convolution bias.

    Args:
        x: (N, C_in, H, W), NCHW or channels_last. The output is channels_last where x or the weight is (as
            torch's convolution decides; an NCHW x is converted once for a channels_last weight), else NCHW.
        weight: (C_out, C_in, kH, kW), any kernel size.
        bn_weight, bn_bias: BatchNorm affine parameters (C_out,), or None (1 and 0).
        running_mean, running_var: (C_out,) running statistics. Training updates them in place exactly as
            F.batch_norm does (None: no update); eval (training=False) normalizes with them.
        stride, padding, dilation: an int or a pair.
        training: batch statistics (True) or running statistics (False). Eval without a gradient to compute
            runs one convolution with BatchNorm folded into its weight and bias (cached per parameter version).
        momentum: running-statistics factor in [0, 1] (nn.BatchNorm2d's momentum=None, the cumulative
            average, is handled by deeplab_ops.nn.FusedConvBNReLU).
        eps: added to the variance.
        residual: optional (N, C_out, H_out, W_out) tensor added before the activation.
        relu: apply ReLU (True) or not.
        backend: "cpu", "cuda", "triton", "reference", None for automatic choice ($DEEPLAB_OPS_BACKEND
            overrides None), or "auto" for automatic choice whatever $DEEPLAB_OPS_BACKEND says.
        process_group: a torch.distributed process group (e.g. ``torch.distributed.group.WORLD``) whose
            processes share BatchNorm statistics in training, as nn.SyncBatchNorm does; None: no synchronization.
            The cpu and cuda backends synchronize; triton refuses (auto picks cuda).
        memory_efficient: save no pre-BN activation for the backward (one activation-sized tensor per layer less);
            the backward recomputes the convolution where it needs it (docs/memory_efficient.md). Same results.

    Returns:
        (N, C_out, H_out, W_out) tensor in x's dtype, in the memory format described for x.
    """
    if memory_efficient is not False and memory_efficient is not True:
        raise TypeError(f"memory_efficient must be a bool, got {memory_efficient!r}")
    # Under torch.autocast the convolution runs in autocast's dtype, as eager conv2d does there (x, weight and the
    # residual cast; BatchNorm's tensors as they are). The cast weight is new on every call: its eval fold is not
    # cached (computed per call, like the cast).
    if process_group is not None and not training:
        group_name_of(process_group)  # checked in eval too (it synchronizes nothing there)
    amp = autocast_dtype(x) if torch._C._is_any_autocast_enabled() else None  # a C call when autocast is off
    if amp is not None:
        cast = autocast_cast(x, amp), autocast_cast(weight, amp), autocast_cast(residual, amp)
        if cast[0] is x and cast[1] is weight and cast[2] is residual:
            amp = None  # already in autocast's dtype (a half model under autocast): nothing cast, as outside it
        else:
            x, weight, residual = cast
    x = conv_layout(x, weight)  # channels_last where x or the weight is, as torch's convolution
    if not training and amp is None and isinstance(weight, Tensor) and enter_directly(x):
        out = eval_fast(x, weight, bn_weight, bn_bias, running_mean, running_var,
                        checked_config(stride, padding, dilation, training, momentum, eps, relu), float(eps),
                        residual, relu, backend)
        if out is not None:
            return out
    stride, padding, dilation = check_args(
        x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, training, momentum, eps,
        residual, relu, empty=True, synchronized=training and process_group is not None,
    )
    group_name = group_name_of(process_group) if training and process_group is not None else None
    direct = enter_directly(x)  # not traced: Python caches (backend choice, the eval fold)
    resolve = backends.resolve_remembered if direct else backends.resolve
    name = resolve(backend, "conv_bn_relu", x.device, x=x, weight=weight, stride=stride, padding=padding,
                   dilation=dilation, synchronized=group_name is not None)
    if x.shape[0] == 0:  # (inline: no call per call) an empty batch runs on the reference, as eager computes it
        name = backend_for_batch(x, name, group_name)
    if name == "reference":
        if group_name is not None:
            raise RuntimeError("deeplab_ops.conv_bn_relu: backend='reference' has no synchronized BatchNorm (a "
                               "process_group in training); use backend='cpu' or 'cuda'")
        return reference.conv_bn_relu(
            x, weight, bn_weight, bn_bias, running_mean, running_var, stride=stride, padding=padding,
            dilation=dilation, training=training, momentum=float(momentum), eps=float(eps), residual=residual,
            relu=relu,
        )
    refuse_grad_transforms("conv_bn_relu", x, weight, bn_weight, bn_bias, residual,
                           statistics=(running_mean, running_var) if training and running_mean is not None else None)
    # (torch.jit.trace records one graph for every grad mode, and checks it by tracing again under no_grad: eval runs
    # the op there, which differentiates and reads the running statistics, not the fold, which has no backward.)
    if (not training and not _needs_grad(x, weight, bn_weight, bn_bias, residual)
            and (direct or jit_tracing() is None)):
        refuse_forward_ad("conv_bn_relu", x, weight, bn_weight, bn_bias, residual)  # these would drop a tangent
        if weight.dtype not in FOLDED_DTYPES:  # half dtypes: the forward's `out` alone, BatchNorm unfolded
            return _eval_unfolded(name, direct and amp is None, x, weight, bn_weight, bn_bias, running_mean,
                                  running_var, stride, padding, dilation, float(eps), residual, relu)
        if not direct or amp is not None:  # traced (the fold is part of the graph), or a weight cast per call
            return CONV_BIAS_ACT[name](x, *_fold(weight, bn_weight, bn_bias, running_mean, running_var, float(eps)),
                                       residual, stride, padding, dilation, relu)
        w, b = derived(("fold", float(eps)), (weight, bn_weight, bn_bias, running_mean, running_var),
                       lambda: _fold(weight, bn_weight, bn_bias, running_mean, running_var, float(eps)),
                       on_store=_keep_transforms)
        with BELOW_AUTOGRAD():  # nothing to differentiate: skip the Autograd key's fallback
            if name == "triton":  # checked above: the twin skips its check
                return call_checked(CONV_BIAS_ACT[name], x, w, b, residual, stride, padding, dilation, relu)
            return CONV_BIAS_ACT[name](x, w, b, residual, stride, padding, dilation, relu)
    args = (x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, training,
            float(momentum), float(eps), residual, relu, group_name, memory_efficient)
    if name == "triton" and direct:  # checked above: the twin skips its check (traced, the graph's op checks)
        out, _, _, _, new_rm, new_rv = call_checked(FORWARD[name], *args)
    else:
        out, _, _, _, new_rm, new_rv = FORWARD[name](*args)
    # A call that built a graph node wrote the statistics in its forward, before saving anything for the backward
    # (csrc/composite/conv_bn_relu_autograd.cpp: so a checkpointed recomputation that stops at the save updated them,
    # as eager BatchNorm's does); the others are written here. (torch.jit.trace and torch.export record the copies
    # always: their graph also runs where no node is built, as under no_grad; where one is, the recorded copy writes
    # what the node wrote; a `direct` call is recorded by neither: no call on its hot path.)
    if training and running_mean is not None and (
            not out.requires_grad or (not direct and graph_for_every_grad_mode())):
        if direct and (running_mean.is_inference() or running_var.is_inference()):  # (not traced: no graph break)
            # Statistics made under torch.inference_mode() (a model built or loaded there), updated outside it (no
            # graph: BatchNorm recalibration under no_grad): eager F.batch_norm writes them inside its kernel, which
            # inference mode does not police; an in-place copy_ outside inference mode would be refused.
            _write_inference(running_mean, running_var, new_rm, new_rv)
        elif direct:
            with BELOW_AUTOGRAD():  # recorded by no graph
                running_mean.copy_(new_rm)
                running_var.copy_(new_rv)
        else:  # traced: detached values, not a no_grad block (torch.export saves one as a node its loader refuses)
            running_mean.copy_(new_rm.detach())
            running_var.copy_(new_rv.detach())
    return out


def _write_inference(running_mean: Tensor, running_var: Tensor, new_rm: Tensor, new_rv: Tensor) -> None:
    """The running statistics' update where one of them is an inference tensor: written inside inference mode,
    which allows in-place writes to inference tensors (and to normal ones), as eager BatchNorm's kernel writes them."""
    with torch.inference_mode():
        running_mean.copy_(new_rm)
        running_var.copy_(new_rv)

"""The fused ASPP op: argument checks, fake kernels, autograd, dispatch.

Two op families share one contract (schemas in csrc/ops.cpp):
  deeplab_ops::aspp_forward / _backward          cpu and cuda backends (ATen convs + C++ BN stages, csrc/aspp.cpp)
  deeplab_ops::triton_aspp_forward / _backward   triton backend (deeplab_ops/triton/aspp.py)
The ops take every BatchNorm's tensors concatenated in the order [1×1 branch, one per rate, image pooling,
projection]; `aspp` below takes per-BN lists as a module has them, concatenates, and copies the updated running
statistics back into each buffer.
"""

from __future__ import annotations

import numbers

import torch

from deeplab_ops import backends, distributed, reference
from deeplab_ops.ops.bn_stages import empty_activation, opmath_dtype

Tensor = torch.Tensor
_ops = torch.ops.deeplab_ops

FORWARD_OPS = {"cpu": _ops.aspp_forward, "cuda": _ops.aspp_forward, "triton": _ops.triton_aspp_forward}
_HALF_DTYPES = (torch.float16, torch.bfloat16)


# ---- fake kernels ----------------------------------------------------------------------------------


def _forward_fake(x, conv_weights, pool_weight, project_weight, bn_weight, bn_bias, running_mean, running_var, rates,
                  training, momentum, eps):
    n, _, h, w = x.shape
    c = conv_weights[0].shape[0]
    b = len(conv_weights)
    stat = opmath_dtype(x.dtype)
    k = (b + 2) * c
    updates = training and running_mean is not None
    rdt = running_mean.dtype if running_mean is not None else stat
    return (
        empty_activation(x, (n, c, h, w)),
        empty_activation(x, (n, b * c, h, w)),
        x.new_empty((n, c)),
        empty_activation(x, (n, c, h, w)),
        x.new_empty((k,), dtype=stat),
        x.new_empty((k,), dtype=stat),
        x.new_empty((k if updates else 0,), dtype=rdt),
        x.new_empty((k if updates else 0,), dtype=rdt),
    )


def _backward_fake(grad_out, x, conv_weights, pool_weight, project_weight, bn_weight, bn_bias, branch_out, pool_out,
                   project_out, out, save_mean, save_invstd, rates, training, output_mask):
    want_x, want_w, want_bn = output_mask
    stat = save_mean.dtype
    k = save_mean.shape[0]
    return (
        empty_activation(x) if want_x else None,
        [torch.empty_like(w) for w in conv_weights] if want_w else [],
        torch.empty_like(pool_weight) if want_w else None,
        torch.empty_like(project_weight) if want_w else None,
        x.new_empty((k,), dtype=stat) if want_bn else None,
        x.new_empty((k,), dtype=stat) if want_bn else None,
    )


# ---- autograd --------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    x, conv_weights, pool_weight, project_weight, bn_weight, bn_bias, _, _, rates, training, _, _ = inputs
    out, branch, pool_pre, proj, mean, invstd, new_rm, new_rv = output
    ctx.mark_non_differentiable(branch, pool_pre, proj, mean, invstd, new_rm, new_rv)
    ctx.save_for_backward(x, pool_weight, project_weight, bn_weight, bn_bias, branch, pool_pre, proj, out, mean,
                          invstd, *conv_weights)
    ctx.conf = (tuple(rates), training, bn_weight.dtype, bn_bias.dtype)


def _make_backward(backward_op):
    def backward(ctx, grad_out, *unused):
        x, pool_w, proj_w, bn_w, bn_b, branch, pool_pre, proj, out, mean, invstd, *conv_ws = ctx.saved_tensors
        rates, training, w_dtype, b_dtype = ctx.conf
        # torch.library unflattens needs_input_grad to the inputs' structure (nig[1]: one bool per conv weight)
        # and wants the gradients in that structure: a list per conv weight, and for `rates` (a list of ints, a
        # leaf) None, except that an empty list is no leaf and wants [] back (rates=(): no atrous branch).
        nig = ctx.needs_input_grad
        mask = [bool(nig[0]), any(nig[1]) or bool(nig[2]) or bool(nig[3]), bool(nig[4]) or bool(nig[5])]
        none = [None] * 12
        none[1] = [None] * len(conv_ws)
        none[8] = None if rates else []
        if grad_out is None or not any(mask):
            return tuple(none)
        gx, gconv, gpool, gproj, gbw, gbb = backward_op(
            grad_out, x, conv_ws, pool_w, proj_w, bn_w, bn_b, branch, pool_pre, proj, out, mean, invstd,
            list(rates), training, mask,
        )
        grads = none
        grads[0] = gx
        if gconv:
            grads[1] = list(gconv)
        grads[2], grads[3] = gpool, gproj
        grads[4] = gbw.to(w_dtype) if gbw is not None else None
        grads[5] = gbb.to(b_dtype) if gbb is not None else None
        return tuple(grads)

    return backward


def _no_double_backward(ctx, *grads):
    raise RuntimeError("deeplab_ops.aspp does not support double backward; use backend='reference' for it")


def _register(prefix: str) -> None:
    fwd, bwd = f"deeplab_ops::{prefix}aspp_forward", f"deeplab_ops::{prefix}aspp_backward"
    torch.library.register_fake(fwd)(_forward_fake)
    torch.library.register_fake(bwd)(_backward_fake)
    torch.library.register_autograd(fwd, _make_backward(getattr(_ops, f"{prefix}aspp_backward")),
                                    setup_context=_setup_context)
    torch.library.register_autograd(bwd, _no_double_backward, setup_context=lambda ctx, inputs, output: None)


_register("")
_register("triton_")


# ---- memory-efficient autograd (memory_efficient=True) ---------------------------------------------
#
# The op above saves, beyond the block input x and the output, the pre-BN branch buffer (N, B*C, H, W), the
# projection's pre-BN output (N, C, H, W) and the (N, C) pooling vector. The lean path saves none of them: the
# backward runs the same forward op once more (no grad, no running-statistics update) for those buffers and
# hands them to the unchanged backward op with the statistics saved by the forward.
#   Why recompute rather than rebuild from the output: the branch buffer has to be recomputed whatever is done
#   with the projection (its dgrad/wgrad and the branch BNs' backward read it, and nothing kept determines it),
#   and with it in hand the projection's pre-BN output is one 1x1 conv of B*C -> C channels (about 2% of the 3x3
#   branches' FLOPs at C_in = 2048, C = 256, three rates). Recomputing is exact in training and eval alike,
#   where a rebuild from the output would be exact only in eval and would need conv_bn_relu's small-|gamma|
#   fallback. The same op on the same backend, the same inputs and the same statistics give the very buffers
#   the forward produced, so the gradients are those of memory_efficient=False. The recompute's extra cost over
#   the conv branches and projection alone: its elementwise BN passes (statistics, apply), a small share.
#   Eval needs the running statistics the forward used: the concatenated copies `aspp` made (2*(B+2)*C values).


class _MemoryEfficientASPP(torch.autograd.Function):
    """The forward op with a backward that recomputes its pre-BN buffers instead of saving them."""

    @staticmethod
    def forward(ctx, name, rates, training, momentum, eps, x, pool_weight, project_weight, bn_weight, bn_bias,
                running_mean, running_var, *conv_weights):
        out, _, _, _, mean, invstd, new_rm, new_rv = FORWARD_OPS[name](
            x, list(conv_weights), pool_weight, project_weight, bn_weight, bn_bias, running_mean, running_var,
            list(rates), training, momentum, eps,
        )
        # Training normalizes with batch statistics: the recompute needs no running statistics (and must not
        # update them). Eval normalizes with these copies, which nothing else holds.
        keep_rm, keep_rv = (None, None) if training else (running_mean, running_var)
        ctx.save_for_backward(x, pool_weight, project_weight, bn_weight, bn_bias, out, mean, invstd, keep_rm,
                              keep_rv, *conv_weights)
        ctx.conf = (name, tuple(rates), training, momentum, eps)
        ctx.mark_non_differentiable(new_rm, new_rv)
        return out, new_rm, new_rv

    @staticmethod
    def backward(ctx, grad_out, *unused):
        # Inputs: name, rates, training, momentum, eps, then x (5), pool (6), project (7), bn weight (8), bn bias
        # (9), running mean, var (10, 11), conv weights (12...).
        nig = ctx.needs_input_grad
        mask = [nig[5], any(nig[12:]) or nig[6] or nig[7], nig[8] or nig[9]]
        grads = [None] * len(nig)
        if grad_out is None or not any(mask):
            return tuple(grads)
        x, pool_w, proj_w, bn_w, bn_b, out, mean, invstd, rm, rv, *conv_ws = ctx.saved_tensors
        name, rates, training, momentum, eps = ctx.conf
        _, branch, pool_pre, proj, _, _, _, _ = FORWARD_OPS[name](
            x, conv_ws, pool_w, proj_w, bn_w, bn_b, rm, rv, list(rates), training, momentum, eps,
        )
        gx, gconv, gpool, gproj, gbw, gbb = BACKWARD_OPS[name](
            grad_out, x, conv_ws, pool_w, proj_w, bn_w, bn_b, branch, pool_pre, proj, out, mean, invstd,
            list(rates), training, mask,
        )
        grads[5], grads[6], grads[7] = gx, gpool, gproj
        grads[8] = gbw.to(bn_w.dtype) if gbw is not None else None
        grads[9] = gbb.to(bn_b.dtype) if gbb is not None else None
        for i, g in enumerate(gconv or []):
            grads[12 + i] = g
        return tuple(grads)


BACKWARD_OPS = {"cpu": _ops.aspp_backward, "cuda": _ops.aspp_backward, "triton": _ops.triton_aspp_backward}


# ---- argument checks -------------------------------------------------------------------------------


def _check_list(value, name: str, length: int, allow_none: bool = False) -> list:
    if value is None and allow_none:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != length:
        got = f"{type(value).__name__} of length {len(value)}" if isinstance(value, (list, tuple)) else repr(value)
        raise ValueError(f"{name} must be a list of {length} tensors (1x1 branch, one per rate, pooling, "
                         f"projection), got {got}")
    for i, t in enumerate(value):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return list(value)


def check_args(x, conv_weights, pool_weight, project_weight, bn_weights, bn_biases, running_means, running_vars,
               rates, training, momentum, eps) -> tuple[int, ...]:
    """Validate an aspp call; errors name the argument, its value and what was expected. Returns the rates."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 4-D (N, C, H, W) tensor, got {shape}")
    if x.dtype not in (torch.float32, torch.float64, *_HALF_DTYPES):
        raise TypeError(f"x has dtype {x.dtype}; expected float32, float64, float16 or bfloat16")
    if not isinstance(rates, (list, tuple)) or not all(
        isinstance(r, numbers.Integral) and not isinstance(r, bool) and r >= 1 for r in rates
    ):
        raise ValueError(f"rates must be a sequence of ints >= 1, got {rates!r}")
    rates = tuple(int(r) for r in rates)
    n, cin, h, w = x.shape
    if n == 0 or h == 0 or w == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    conv_weights = _check_list(conv_weights, "conv_weights", len(rates) + 1)
    c = conv_weights[0].shape[0] if conv_weights[0].dim() == 4 else -1
    for i, wt in enumerate(conv_weights):
        k = 1 if i == 0 else 3
        if tuple(wt.shape) != (c, cin, k, k):
            raise ValueError(f"conv_weights[{i}] must have shape {(c, cin, k, k)}, got {tuple(wt.shape)}")
    for name, t, shape in (("pool_weight", pool_weight, (c, cin, 1, 1)),
                           ("project_weight", project_weight, (c, (len(rates) + 2) * c, 1, 1))):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    for name, t in [("pool_weight", pool_weight), ("project_weight", project_weight)] + [
        (f"conv_weights[{i}]", t) for i, t in enumerate(conv_weights)
    ]:
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; expected the same device")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; expected the same dtype")
    n_bn = len(rates) + 3
    lists = {
        "bn_weights": _check_list(bn_weights, "bn_weights", n_bn),
        "bn_biases": _check_list(bn_biases, "bn_biases", n_bn),
        "running_means": _check_list(running_means, "running_means", n_bn, allow_none=True),
        "running_vars": _check_list(running_vars, "running_vars", n_bn, allow_none=True),
    }
    allowed = (x.dtype, torch.float32) if x.dtype in _HALF_DTYPES else (x.dtype,)
    dtypes = set()
    for name, ts in lists.items():
        for i, t in enumerate(ts or []):
            if tuple(t.shape) != (c,):
                raise ValueError(f"{name}[{i}] must have shape ({c},), got {tuple(t.shape)}")
            if t.device != x.device:
                raise ValueError(f"{name}[{i}] is on {t.device} but x is on {x.device}; expected the same device")
            if t.dtype not in allowed:
                raise TypeError(f"{name}[{i}] has dtype {t.dtype}; expected " + " or ".join(map(str, allowed)))
            dtypes.add(t.dtype)
    if len(dtypes) > 1:
        raise TypeError(f"the BatchNorm tensors must share one dtype, got {sorted(map(str, dtypes))}")
    if (running_means is None) != (running_vars is None):
        raise ValueError("running_means and running_vars must be given together")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {training!r}")
    if not training and running_means is None:
        raise ValueError("training=False (eval) uses running statistics: running_means and running_vars are needed")
    if training and n < 2:
        raise ValueError(
            f"aspp in training mode needs a batch of 2 or more (got N={n}): the image-pooling branch has one value "
            "per channel and image, so its BatchNorm over a batch of 1 is undefined (PyTorch raises too). Use a "
            "batch of 2 or more, or eval mode / frozen BatchNorm (model.eval() on the BatchNorm layers)"
        )
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"eps must be a number > 0, got {eps!r}")
    return rates


# ---- public functional -----------------------------------------------------------------------------


def aspp(
    x: Tensor,
    conv_weights: list[Tensor],
    pool_weight: Tensor,
    project_weight: Tensor,
    bn_weights: list[Tensor],
    bn_biases: list[Tensor],
    running_means: list[Tensor] | None,
    running_vars: list[Tensor] | None,
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
        x: (N, C_in, H, W), NCHW or channels_last.
        conv_weights: [1×1 branch (C, C_in, 1, 1), then one (C, C_in, 3, 3) per rate].
        pool_weight: the image-pooling branch's (C, C_in, 1, 1).
        project_weight: (C, (len(rates) + 2) * C, 1, 1).
        bn_weights, bn_biases, running_means, running_vars: one (C,) tensor per BatchNorm in the order
            [1×1 branch, one per rate, pooling, projection]; running_* may be None (no running statistics).
            Training updates the running statistics in place as nn.BatchNorm2d does.
        rates: the atrous rates (dilation = padding) of the 3×3 branches.
        training, momentum, eps: as for every BatchNorm of the module (shared).
        backend: "cpu", "cuda", "triton", "reference" or None (automatic; $DEEPLAB_OPS_BACKEND overrides None).
        process_group: a torch.distributed process group whose processes share BatchNorm statistics in training
            (nn.SyncBatchNorm semantics); None: no synchronization.
        memory_efficient: keep no pre-BN activation for the backward (neither the (N, (len(rates) + 1) * C, H, W)
            branch buffer nor the projection's pre-BN output): the backward recomputes them by one more forward
            of the op on the same backend. Same gradients and running statistics. The reference backend and
            the synchronized (process_group, training) path ignore it and keep theirs.
    """
    rates = check_args(x, conv_weights, pool_weight, project_weight, bn_weights, bn_biases, running_means,
                       running_vars, rates, training, momentum, eps)
    if not isinstance(memory_efficient, bool):
        raise TypeError(f"memory_efficient must be a bool, got {memory_efficient!r}")
    cat = torch.cat
    rm = cat(running_means) if running_means is not None else None
    rv = cat(running_vars) if running_vars is not None else None
    if process_group is not None and training and distributed.group_size(process_group) > 1:
        out = distributed.SyncASPP.apply(x, pool_weight, project_weight, cat(bn_weights), cat(bn_biases), rm, rv,
                                         rates, float(momentum), float(eps), process_group, *conv_weights)
        _copy_running(running_means, running_vars, rm, rv)
        return out
    name = backends.resolve(backend, "aspp", x.device, x=x, rates=rates, training=training,
                            channels=conv_weights[0].shape[0])
    if name == "reference":
        return reference.aspp(x, conv_weights, pool_weight, project_weight, bn_weights, bn_biases, running_means,
                              running_vars, rates=rates, training=training, momentum=float(momentum), eps=float(eps))
    if name not in FORWARD_OPS:
        raise RuntimeError(f"deeplab_ops.aspp: backend {name!r} has no ASPP kernels yet; use 'cpu', 'cuda' or 'triton'")
    if memory_efficient and torch.is_grad_enabled():
        out, new_rm, new_rv = _MemoryEfficientASPP.apply(
            name, rates, training, float(momentum), float(eps), x, pool_weight, project_weight, cat(bn_weights),
            cat(bn_biases), rm, rv, *conv_weights,
        )
    else:
        out, *_, new_rm, new_rv = FORWARD_OPS[name](
            x, list(conv_weights), pool_weight, project_weight, cat(bn_weights), cat(bn_biases), rm, rv,
            list(rates), training, float(momentum), float(eps),
        )
    if training:
        _copy_running(running_means, running_vars, new_rm, new_rv)
    return out


def _copy_running(running_means, running_vars, new_rm, new_rv) -> None:
    """Copy the concatenated updated running statistics back into each BatchNorm's buffers."""
    if running_means is None:
        return
    with torch.no_grad():
        for i, (m, v) in enumerate(zip(running_means, running_vars, strict=True)):
            c = m.shape[0]
            m.copy_(new_rm[i * c:(i + 1) * c])
            v.copy_(new_rv[i * c:(i + 1) * c])

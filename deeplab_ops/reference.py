"""Pure-PyTorch ground truth for every deeplab_ops op: the tests' oracle, and the `reference` backend.

The fused op is defined as what these compute. The stage references compute what the BatchNorm stage ops of
csrc/ops.cpp compute, in float64 whatever the input dtype, so that tests can check each stage of a backend
separately: bn_stats, bn_backward_reduce and bn_backward_dy take the ops' arguments; bn_finalize returns
(mean, invstd) and updates the running statistics in place (the op writes them out of place), and bn_apply takes
the per-channel scale and shift (invstd * weight, bias) instead of invstd, weight and bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

from deeplab_ops.common import is_functorch_wrapped, jit_tracing

Tensor = torch.Tensor


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
) -> Tensor:
    """`act(BN(conv(x, weight)) [+ residual])`, exactly as the unfused PyTorch modules compute it."""
    y = _conv2d(x, weight, stride, padding, dilation)
    z = _batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if residual is not None:
        z = z + residual
    return F.relu(z) if relu else z


def _conv2d(x: Tensor, weight: Tensor, stride, padding, dilation) -> Tensor:
    """F.conv2d(x, weight, None, stride, padding, dilation); in float64, rounded back, for the CPU geometries that
    PyTorch's oneDNN computes wrong or crashes on (csrc/cpu/onednn_guard_cpu.h), as the cpu backend does."""
    pairs = [(v, v) if isinstance(v, int) else tuple(v) for v in (stride, padding, dilation)]
    # Not while torch.onnx.export records with torch.export (dynamo=True): its tensors are fake (no oneDNN runs),
    # the file runs on another runtime, and the guard's loop over output positions would fix the recorded image size
    # (a dynamic height or width was exported as a constant). Traced by torch.jit (dynamo=False) the tensors are
    # real and the sizes the example's: the guard runs, and its float64 path is recorded.
    recording = torch.compiler.is_exporting() and torch.onnx.is_in_onnx_export()
    if not recording and _onednn_unsafe(x, weight, *pairs):
        # in the layout oneDNN writes: channels_last where x or the weight is
        cl = _suggests_channels_last(x) or _suggests_channels_last(weight)
        return F.conv2d(x.double(), weight.double(), None, stride, padding, dilation).to(x.dtype).contiguous(
            memory_format=torch.channels_last if cl else torch.contiguous_format)
    return F.conv2d(x, weight, None, stride, padding, dilation)


def _suggests_channels_last(t: Tensor) -> bool:
    """Whether `t` is laid out channels_last as PyTorch's convolutions and BatchNorm read it (suggest_memory_format).
    Traced by torch.jit (ONNX export), sizes are tensors, which suggest_memory_format cannot take: the strides' exact
    test there."""
    if jit_tracing() is None:
        return suggest_memory_format(t) == torch.channels_last
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _onednn_unsafe(x: Tensor, weight: Tensor, stride, padding, dilation) -> bool:
    """The twin of csrc/cpu/onednn_guard_cpu.h's onednn_unsafe_conv (tests/ops/test_onednn_guard.py holds them
    equal): along an axis with stride > 1, an output of one position, a kernel wider than the input, an output
    position that reads only padding, or (float32) a dilated kernel; in bfloat16 also an output position that reads
    only padding along an axis of stride 1, and a strided axis of kernel 1 beside an axis whose kernel is wider."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.dim() != 4:
        return False
    bf16 = x.dtype == torch.bfloat16
    outs = [(x.shape[d + 2] + 2 * padding[d] - dilation[d] * (weight.shape[d + 2] - 1) - 1) // stride[d] + 1
            for d in range(2)]
    if min(outs) < 1:
        return False
    for d in range(2):
        size, k, s, p, dil, out = x.shape[d + 2], weight.shape[d + 2], stride[d], padding[d], dilation[d], outs[d]
        if s == 1:
            if bf16 and _reads_only_padding(size, out, p, dil, k, 1):
                return True
            continue
        if out == 1 or dil * (k - 1) + 1 > size or _reads_only_padding(size, out, p, dil, k, s):
            return True
        if (x.dtype == torch.float32 and k > 1 and dil > 1) or (bf16 and k == 1 and weight.shape[3 - d] > 1):
            return True
    return False


def _reads_only_padding(size, out, pad, dil, k, stride) -> bool:
    """Whether some output position along one axis reads only padding: none of its k taps lands in [0, size)."""
    return any(not any(0 <= o * stride - pad + t * dil < size for t in range(k)) for o in range(out))


def _batch_norm(y, running_mean, running_var, weight, bias, training, momentum, eps) -> Tensor:
    """F.batch_norm with unit-stride per-channel vectors. PyTorch's CPU batch-norm backward for channels_last input
    (and 1x1 maps, which count as channels_last) reads a strided weight, or in eval strided running statistics, as
    if contiguous (torch 2.14: the gradients come out wrong, NaN where the gaps hold NaN). Running statistics that
    training updates in place are passed as given (the forward honours their strides; the backward does not read
    them)."""
    weight, bias = (t if t is None else t.contiguous() for t in (weight, bias))
    if not training:
        running_mean, running_var = (t if t is None else t.contiguous() for t in (running_mean, running_var))
    return F.batch_norm(y, running_mean, running_var, weight, bias, training, momentum, eps)


# ---- stages (float64 math) --------------------------------------------------------------------------


def _channels_last_2d(t: Tensor) -> Tensor:
    """(N, C, H, W) -> (N*H*W, C) in float64."""
    return t.double().permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def bn_stats(y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and M2 = sum((y - mean)^2) over (N, H, W), two-pass in float64."""
    v = _channels_last_2d(y)
    mean = v.mean(0)
    return mean, ((v - mean) ** 2).sum(0)


def bn_finalize(
    count: Tensor,
    mean: Tensor,
    m2: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Merge (P,) counts and (P, C) partial means/M2s; update running stats in place as F.batch_norm does."""
    count, mean, m2 = count.double()[:, None], mean.double(), m2.double()
    n = count.sum(0)
    total_mean = (count * mean).sum(0) / n
    total_m2 = (m2 + count * (mean - total_mean) ** 2).sum(0)
    var = total_m2 / n
    if running_mean is not None:
        unbiased = total_m2 / (n - 1)
        running_mean.copy_((1 - momentum) * running_mean.double() + momentum * total_mean)
        running_var.copy_((1 - momentum) * running_var.double() + momentum * unbiased)
    return total_mean, (var + eps).rsqrt()


def bn_apply(
    y: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None, relu: bool
) -> Tensor:
    """`act((y - mean) * scale + shift [+ residual])`, in float64, returned in y's dtype."""
    c = (1, -1, 1, 1)
    z = (y.double() - mean.double().view(c)) * scale.double().view(c) + shift.double().view(c)
    if residual is not None:
        z = z + residual.double()
    if relu:
        z = F.relu(z)
    return z.to(y.dtype)


def act_grad(grad_out: Tensor, out: Tensor, relu: bool) -> Tensor:
    """The gradient at the BN (+ residual) output: ReLU's backward is PyTorch's threshold_backward (zero where the
    output is <= 0; a NaN output passes its gradient)."""
    g = grad_out.double()
    return torch.where(out <= 0, torch.zeros_like(g), g) if relu else g


def bn_backward_reduce(
    grad_out: Tensor, out: Tensor, y: Tensor, mean: Tensor, invstd: Tensor, relu: bool
) -> tuple[Tensor, Tensor]:
    """(sum g, sum g * xhat) per channel, g = the gradient through the activation."""
    c = (1, -1, 1, 1)
    g = act_grad(grad_out, out, relu)
    xhat = (y.double() - mean.double().view(c)) * invstd.double().view(c)
    return g.sum((0, 2, 3)), (g * xhat).sum((0, 2, 3))


def bn_backward_dy(
    grad_out: Tensor,
    out: Tensor,
    y: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    sum_g: Tensor | None,
    sum_g_xhat: Tensor | None,
    count: float,
    relu: bool,
    training: bool,
) -> Tensor:
    """Gradient w.r.t. the BN input y, in float64, returned in y's dtype."""
    c = (1, -1, 1, 1)
    g = act_grad(grad_out, out, relu)
    invstd = invstd.double().view(c)
    k = invstd if weight is None else weight.double().view(c) * invstd
    if not training:
        return (k * g).to(y.dtype)
    xhat = (y.double() - mean.double().view(c)) * invstd
    dy = k * (g - sum_g.double().view(c) / count - xhat * sum_g_xhat.double().view(c) / count)
    return dy.to(y.dtype)


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
) -> Tensor:
    """torchvision's ASPP (without its dropout): conv branches + image pooling → concat → 1×1 projection.

    BatchNorm tensors are in the order [1×1 branch, one per rate, pooling, projection].
    """
    n_bn = len(rates) + 3
    rms = running_means if running_means is not None else [None] * n_bn
    rvs = running_vars if running_vars is not None else [None] * n_bn

    def bn_relu(y: Tensor, i: int) -> Tensor:
        return F.relu(_batch_norm(y, rms[i], rvs[i], bn_weights[i], bn_biases[i], training, momentum, eps))

    outs = [bn_relu(F.conv2d(x, conv_weights[0]), 0)]
    for i, r in enumerate(rates):
        outs.append(bn_relu(F.conv2d(x, conv_weights[i + 1], padding=r, dilation=r), i + 1))
    pooled = bn_relu(F.conv2d(F.adaptive_avg_pool2d(x, 1), pool_weight), len(rates) + 1)
    outs.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False))
    out = bn_relu(F.conv2d(torch.cat(outs, dim=1), project_weight), len(rates) + 2)
    # channels_last for a channels_last x, as the other backends return it (the upsampled pooling branch, a 1x1
    # map's interpolation, comes out NCHW and turns the concatenation NCHW). Under torch.func's vmap (which runs the
    # aspp here) a wrapped tensor has no layout to ask about (asked outside torch.compile only: dynamo cannot trace
    # the question, and its tensors are not wrapped).
    if (torch.compiler.is_compiling() or not is_functorch_wrapped(x)) and _suggests_channels_last(x):
        return out.contiguous(memory_format=torch.channels_last)
    return out


def upsample_cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = 255,
    align_corners: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of the bilinearly upsampled logits (N, K, h, w) against labels (N, H, W): materializes
    the (N, K, H, W) upsampled tensor, which the fused op never does."""
    up = F.interpolate(logits, size=tuple(target.shape[-2:]), mode="bilinear", align_corners=align_corners)
    return F.cross_entropy(up, target, ignore_index=ignore_index, reduction=reduction)

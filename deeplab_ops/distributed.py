"""BatchNorm statistics synchronized across processes for the fused ops (SyncBatchNorm semantics).

Given a process group with more than one process, in training:
  forward   each process computes its (count, mean, M2) per channel from its own conv output; the partials of all
            processes are all-gathered and merged with Chan's formula by bn_finalize (never E[y^2] - E[y]^2), so
            every process normalizes with the statistics of the global batch and updates identical running stats;
  backward  each process reduces (sum g, sum g*xhat) locally; the BN weight/bias gradients are these local sums
            (DDP averages parameter gradients, as with nn.SyncBatchNorm), while the input gradient uses the sums
            all-reduced over the group and the global count.
The composition is the BN stage ops (CPU / CUDA C++ kernels) around ATen convolutions; eval mode, or a group of
one process, takes the ordinary fused path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

Tensor = torch.Tensor
_ops = torch.ops.deeplab_ops


def group_size(process_group) -> int:
    """World size of `process_group` (None: the default group), 1 when torch.distributed is not initialized."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(process_group)


def global_stats(y: Tensor, process_group) -> tuple[Tensor, Tensor, Tensor]:
    """All processes' (count, mean, M2) partials of y's channels: shapes (P,), (P, C), (P, C)."""
    mean, m2 = _ops.bn_stats(y)
    count = float(y.shape[0] * y.shape[2] * y.shape[3])
    local = torch.cat([mean.new_tensor([count]), mean, m2])
    gathered = [torch.empty_like(local) for _ in range(group_size(process_group))]
    dist.all_gather(gathered, local, group=process_group)
    parts = torch.stack(gathered)
    c = mean.shape[0]
    return parts[:, 0], parts[:, 1:1 + c], parts[:, 1 + c:]


class SyncConvBNReLU(torch.autograd.Function):
    """conv → BatchNorm over the batch of every process in the group (→ + residual) → ReLU."""

    @staticmethod
    def forward(ctx, x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, momentum,
                eps, residual, relu, process_group):
        mf = suggest_memory_format(x)
        y = F.conv2d(x, weight, None, stride, padding, dilation).contiguous(memory_format=mf)
        counts, means, m2s = global_stats(y, process_group)
        mean, invstd = _ops.bn_finalize(counts, means, m2s, running_mean, running_var, momentum, eps)
        scale = invstd * bn_weight.to(invstd.dtype) if bn_weight is not None else invstd.clone()
        shift = bn_bias.to(invstd.dtype) if bn_bias is not None else torch.zeros_like(invstd)
        out = _ops.bn_apply(y, mean, scale, shift, residual, relu)
        ctx.save_for_backward(x, weight, bn_weight, y, out, mean, invstd)
        ctx.conf = (stride, padding, dilation, relu, process_group, float(counts.sum()))
        ctx.param_dtypes = (None if bn_weight is None else bn_weight.dtype, None if bn_bias is None else bn_bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bn_weight, y, out, mean, invstd = ctx.saved_tensors
        stride, padding, dilation, relu, group, total = ctx.conf
        grad_out = grad_out.contiguous(memory_format=suggest_memory_format(y))
        sum_g, sum_gx = _ops.bn_backward_reduce(grad_out, out, y, mean, invstd, relu)
        grads = [None] * 14
        grads[2] = sum_gx.to(ctx.param_dtypes[0]) if ctx.needs_input_grad[2] else None
        grads[3] = sum_g.to(ctx.param_dtypes[1]) if ctx.needs_input_grad[3] else None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            sums = torch.cat([sum_g, sum_gx])
            dist.all_reduce(sums, group=group)
            c = sum_g.shape[0]
            dy = _ops.bn_backward_dy(grad_out, out, y, mean, invstd, bn_weight, sums[:c], sums[c:], total, relu, True)
            gx, gw, _ = torch.ops.aten.convolution_backward(
                dy, x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], 1,
                [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False],
            )
            grads[0], grads[1] = gx, gw
        if ctx.needs_input_grad[11]:
            grads[11] = torch.ops.aten.threshold_backward(grad_out, out, 0) if relu else grad_out
        return tuple(grads)

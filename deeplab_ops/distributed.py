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


def _finalize_block(pre: Tensor, process_group, running_mean, running_var, momentum, eps):
    counts, means, m2s = global_stats(pre, process_group)
    mean, invstd = _ops.bn_finalize(counts, means, m2s, running_mean, running_var, momentum, eps)
    return mean, invstd, float(counts.sum())


def _all_reduced(*tensors: Tensor, group) -> list[Tensor]:
    flat = torch.cat(tensors)
    dist.all_reduce(flat, group=group)
    return list(flat.split([t.shape[0] for t in tensors]))


class SyncASPP(torch.autograd.Function):
    """The fused ASPP with every BatchNorm's statistics taken over the batch of every process in the group.

    Same composition as the cpu/cuda ASPP op (csrc/aspp.cpp): one BN pass over all conv branches, the pooling
    branch as a per-(image, channel) projection bias, normalized branch outputs recomputed in backward.
    """

    @staticmethod
    def forward(ctx, x, pool_weight, project_weight, bn_weight, bn_bias, running_mean, running_var, rates, momentum,
                eps, process_group, *conv_weights):
        n, cin, h, w = x.shape
        c = conv_weights[0].shape[0]
        nb = len(conv_weights)
        bc = nb * c
        mf = suggest_memory_format(x)
        stat = invstd_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        ys = [F.conv2d(x, conv_weights[0])] + [
            F.conv2d(x, wt, padding=r, dilation=r) for wt, r in zip(conv_weights[1:], rates, strict=True)
        ]
        branch = torch.cat(ys, 1).contiguous(memory_format=mf)
        pooled = x.mean((2, 3))
        pool_pre = (pooled @ pool_weight.reshape(c, cin).t()).contiguous()
        pool4 = pool_pre.view(n, c, 1, 1)

        def blk(t, start, length):
            return None if t is None else t.narrow(0, start, length)

        bw, bb = bn_weight.to(stat), bn_bias.to(stat)
        mean_b, invstd_b, count_b = _finalize_block(branch, process_group, blk(running_mean, 0, bc),
                                                    blk(running_var, 0, bc), momentum, eps)
        mean_p, invstd_p, count_p = _finalize_block(pool4, process_group, blk(running_mean, bc, c),
                                                    blk(running_var, bc, c), momentum, eps)
        z_cat = _ops.bn_apply(branch, mean_b, bw[:bc] * invstd_b, bb[:bc], None, True)
        z_p = _ops.bn_apply(pool4, mean_p, bw[bc:bc + c] * invstd_p, bb[bc:bc + c], None, True)
        w_main = project_weight[:, :bc].contiguous()
        w_pool = project_weight[:, bc:].reshape(c, c)
        proj = F.conv2d(z_cat, w_main).contiguous(memory_format=mf)
        proj = proj + (z_p.view(n, c) @ w_pool.t()).view(n, c, 1, 1)
        mean_o, invstd_o, _ = _finalize_block(proj, process_group, blk(running_mean, bc + c, c),
                                              blk(running_var, bc + c, c), momentum, eps)
        out = _ops.bn_apply(proj, mean_o, bw[bc + c:] * invstd_o, bb[bc + c:], None, True)
        ctx.save_for_backward(x, pool_weight, project_weight, bn_weight, bn_bias, branch, pool_pre, proj, out,
                              torch.cat([mean_b, mean_p, mean_o]), torch.cat([invstd_b, invstd_p, invstd_o]).to(
                                  invstd_dtype), *conv_weights)
        ctx.conf = (tuple(rates), process_group, count_b, count_p)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, pool_w, proj_w, bn_w, bn_b, branch, pool_pre, proj, out, mean, invstd, *conv_ws = ctx.saved_tensors
        rates, group, count_hw, count_n = ctx.conf
        n, cin, h, w = x.shape
        c = conv_ws[0].shape[0]
        bc = len(conv_ws) * c
        mf = suggest_memory_format(x)
        bw, bb = bn_w.to(mean.dtype), bn_b.to(mean.dtype)
        sl_b, sl_p, sl_o = slice(0, bc), slice(bc, bc + c), slice(bc + c, bc + 2 * c)
        g = grad_out.contiguous(memory_format=mf)

        sg_o, sgx_o = _ops.bn_backward_reduce(g, out, proj, mean[sl_o], invstd[sl_o], True)
        gsg_o, gsgx_o = _all_reduced(sg_o, sgx_o, group=group)
        dy_o = _ops.bn_backward_dy(g, out, proj, mean[sl_o], invstd[sl_o], bw[sl_o], gsg_o, gsgx_o, count_hw, True,
                                   True)
        z_cat = _ops.bn_apply(branch, mean[sl_b], bw[sl_b] * invstd[sl_b], bb[sl_b], None, True)
        pool4 = pool_pre.view(n, c, 1, 1)
        z_p = _ops.bn_apply(pool4, mean[sl_p], bw[sl_p] * invstd[sl_p], bb[sl_p], None, True)
        w_main = proj_w[:, :bc].contiguous()
        w_pool = proj_w[:, bc:].reshape(c, c)
        dz_cat, dw_main, _ = torch.ops.aten.convolution_backward(
            dy_o, z_cat, w_main, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False])
        dz_cat = dz_cat.contiguous(memory_format=mf)
        dbias = dy_o.sum((2, 3))
        dz_p = (dbias @ w_pool).view(n, c, 1, 1).contiguous()
        grad_proj = torch.cat([dw_main, (dbias.t() @ z_p.view(n, c)).view(c, c, 1, 1)], 1)

        sg_p, sgx_p = _ops.bn_backward_reduce(dz_p, z_p, pool4, mean[sl_p], invstd[sl_p], True)
        gsg_p, gsgx_p = _all_reduced(sg_p, sgx_p, group=group)
        dy_p = _ops.bn_backward_dy(dz_p, z_p, pool4, mean[sl_p], invstd[sl_p], bw[sl_p], gsg_p, gsgx_p, count_n,
                                   True, True).view(n, c)
        grad_pool = (dy_p.t() @ x.mean((2, 3))).view(c, cin, 1, 1)

        sg_b, sgx_b = _ops.bn_backward_reduce(dz_cat, z_cat, branch, mean[sl_b], invstd[sl_b], True)
        gsg_b, gsgx_b = _all_reduced(sg_b, sgx_b, group=group)
        dy_b = _ops.bn_backward_dy(dz_cat, z_cat, branch, mean[sl_b], invstd[sl_b], bw[sl_b], gsg_b, gsgx_b,
                                   count_hw, True, True)
        gx = ((dy_p @ pool_w.reshape(c, cin)) / (h * w)).view(n, cin, 1, 1).expand(n, cin, h, w)
        gx = gx.contiguous(memory_format=mf)
        grad_convs = []
        for i, wt in enumerate(conv_ws):
            r = 1 if i == 0 else rates[i - 1]
            pad = 0 if i == 0 else r
            dyb = dy_b[:, i * c:(i + 1) * c].contiguous(memory_format=mf)
            dxb, dwb, _ = torch.ops.aten.convolution_backward(
                dyb, x, wt, None, [1, 1], [pad, pad], [r, r], False, [0, 0], 1, [True, True, False])
            gx = gx + dxb
            grad_convs.append(dwb)
        grad_bw = torch.cat([sgx_b, sgx_p, sgx_o]).to(bn_w.dtype)
        grad_bb = torch.cat([sg_b, sg_p, sg_o]).to(bn_b.dtype)
        return (gx, grad_pool, grad_proj, grad_bw, grad_bb, None, None, None, None, None, None, *grad_convs)

"""torchrun support: process-group setup and BatchNorm synchronized across processes on CPU (gloo) and GPU (NCCL).

torch.nn.SyncBatchNorm runs on GPUs only, so on CPU the unfused model uses `DistributedBatchNorm2d`: the batch
mean and variance are computed over all processes' pixels with two all-reduces (sum, then the sum of squared
deviations from the global mean: a two-pass variance, no E[x²]−E[x]² cancellation); autograd differentiates
through `_AllReduceSum`, whose backward all-reduces the gradient: that gives the synchronized backward sums
(Σ dy and Σ dy·x̂ over all processes). On GPU, nn.SyncBatchNorm is used.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


DEFAULT_TIMEOUT_MIN = 30.0  # torch's default for gloo


_LAUNCH_HINT = "launch with torchrun, or unset WORLD_SIZE for a single-process run"


def _env_int(name: str, low: int, high: int | None, what: str) -> int:
    """The integer in $`name` (set), in [low, high] (high None: no bound); anything else: ValueError naming the
    variable, its value and what was expected."""
    raw = os.environ[name]
    expected = f"expected an integer {f'>= {low}' if high is None else f'in [{low}, {high}]'} ({what})"
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer; {expected}") from None
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name}={raw.strip()} is out of range; {expected}")
    return value


def env_dist_info() -> DistInfo:
    """This process's place in a torchrun launch, read and checked from the environment (torchrun sets WORLD_SIZE,
    RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT). WORLD_SIZE unset, empty or 1: a single process, DistInfo(), and
    the others are not read (torch.distributed is not initialised). WORLD_SIZE > 1 needs RANK and LOCAL_RANK in
    [0, WORLD_SIZE), MASTER_ADDR, and MASTER_PORT in [1, 65535]. Anything else: ValueError, one line naming the
    variable, its value and what was expected."""
    if os.environ.get("WORLD_SIZE", "").strip() == "":
        return DistInfo()
    world = _env_int("WORLD_SIZE", 1, None, "the number of processes, as torchrun sets it; unset for a single "
                                            "process")
    if world == 1:
        return DistInfo()
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if os.environ.get(name, "").strip() == "":
            raise ValueError(f"WORLD_SIZE={world} but {name} is not set: {_LAUNCH_HINT}")
    rank = _env_int("RANK", 0, world - 1, f"this process's rank among the WORLD_SIZE={world} processes")
    local_rank = _env_int("LOCAL_RANK", 0, world - 1, "this process's index on its machine")
    _env_int("MASTER_PORT", 1, 65535, "the TCP port of the rank-0 process")
    return DistInfo(rank, world, local_rank)


def init_from_env(device_type: str, timeout_min: float = DEFAULT_TIMEOUT_MIN) -> DistInfo:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPU, gloo on CPU.
    A collective waits `timeout_min` minutes for the other processes (a hung one: then this one stops).
    A malformed launch environment (env_dist_info): ValueError, before torch.distributed reads it."""
    info = env_dist_info()
    if not info.enabled:
        return info
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_min))
    return info


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes (no autograd), in place; returns the tensor."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# What a collective raises when a peer process has gone: gloo names the broken connection; torch raises
# DistNetworkError for a store or socket connection lost. (Not any DistError: a timeout may be a hang of ours.)
_LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Socket closed")


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective's failure because another process stopped."""
    network_error = getattr(dist, "DistNetworkError", None)
    return ((network_error is not None and isinstance(error, network_error))
            or any(s in str(error) for s in _LOST_PEER))


# What a collective raises when its wait ran out of the process group's timeout: gloo's "Timed out waiting …ms for
# recv operation to complete", NCCL's "… collective operation timed out …" (where its watchdog does not end the
# process first). Not any "timed out": CUDA's "the launch timed out and was terminated" is no wait for a process.
_TIMED_OUT = ("Timed out waiting", "operation timed out", "timed out in blocking wait")


def timed_out(error: BaseException) -> bool:
    """Whether `error` is a collective's wait that ran out of --dist-timeout (gloo's or NCCL's words for it, or a
    torch.distributed DistError that says it timed out)."""
    text = str(error)
    dist_error = getattr(dist, "DistError", None)
    return (any(s in text for s in _TIMED_OUT)
            or (dist_error is not None and isinstance(error, dist_error) and "timed out" in text.lower()))


def all_gather_objects(obj) -> list:
    """Every process's `obj` (picklable), in rank order."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of every process's input is the sum of every process's output gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(x.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(grad.clone())


class DistributedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics (and so its backward sums) cover the batch of every process.

    Same parameters, buffers and state_dict keys as nn.BatchNorm2d; identical to it when not distributed or in eval.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        self._check_input_dim(x)
        c = x.shape[1]
        # The statistics in float32, or in float64 for a float64 input (as nn.SyncBatchNorm and F.batch_norm compute
        # them): float32 there would round a float64 model's every BatchNorm (~1e-5 off eager).
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        # The count in float64: exact at any batch (float32 rounds counts above 2**24 pixels per channel).
        count = torch.tensor([x.numel() // c], dtype=torch.float64, device=x.device)
        dist.all_reduce(count)
        n = float(count.item())
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training across processes, got {n:.0f}")
        mean = all_reduce(xf.sum(dim=(0, 2, 3))) / n
        centred = xf - mean.view(1, c, 1, 1)
        var = all_reduce((centred * centred).sum(dim=(0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)


SYNC_BN_TYPES = (nn.SyncBatchNorm, DistributedBatchNorm2d)


def synchronized_batchnorm(model: nn.Module) -> bool:
    """Whether `model` synchronizes BatchNorm statistics across processes: an nn.SyncBatchNorm or
    DistributedBatchNorm2d, or a fused deeplab_ops module given a process group (convert_sync_batchnorm)."""
    from deeplab_ops.fusion import fused_config
    from deeplab_ops.nn import FusedASPP, FusedConvBNReLU

    for m in model.modules():
        if isinstance(m, SYNC_BN_TYPES):
            return True
        group = m.process_group if isinstance(m, (FusedConvBNReLU, FusedASPP)) else getattr(fused_config(m),
                                                                                             "process_group", None)
        if group is not None:
            return True
    return False


def convert_sync_batchnorm(model: nn.Module, device_type: str) -> nn.Module:
    """Synchronize every BatchNorm's statistics across the processes (state_dict unchanged).

    Fused deeplab_ops modules (FusedConvBNReLU, FusedASPP, and what deeplab_ops.nn.fuse_modules made) share
    their statistics through the fused ops' process group (deeplab_ops.nn.sync_batchnorm); every other
    nn.BatchNorm2d becomes nn.SyncBatchNorm on CUDA, DistributedBatchNorm2d on CPU (gloo)."""
    from deeplab_ops.fusion import fused_batchnorms, replace_unfused_batchnorms
    from deeplab_ops.nn import sync_batchnorm

    owned = fused_batchnorms(model)
    if owned:
        sync_batchnorm(model)
    convert = nn.SyncBatchNorm.convert_sync_batchnorm if device_type == "cuda" else _convert_cpu
    return replace_unfused_batchnorms(model, convert, owned)


def _convert_cpu(bn: nn.BatchNorm2d) -> DistributedBatchNorm2d:
    """A DistributedBatchNorm2d sharing `bn`'s parameters and buffers."""
    out = DistributedBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                                 device=bn.weight.device if bn.affine else None)
    if bn.affine:
        with torch.no_grad():
            out.weight = bn.weight
            out.bias = bn.bias
    out.running_mean = bn.running_mean
    out.running_var = bn.running_var
    out.num_batches_tracked = bn.num_batches_tracked
    out.train(bn.training)
    return out

"""What every op's front door and autograd share: the process group's name for the ops, and the backward ops called
past the Autograd key."""

from __future__ import annotations

import torch


def group_name_of(process_group) -> str | None:
    """The name of `process_group` when it has more than one process (None: nothing to synchronize)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(process_group) <= 1:
        return None
    return process_group.group_name


def below_autograd(op):
    """`op`, called past the Autograd dispatch key when no graph is being built (create_graph=False, the usual
    backward): the backward ops' autograd kernels only refuse double backward, and cost a Python hop per call."""
    if torch.is_grad_enabled():
        return op

    def call(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    return call

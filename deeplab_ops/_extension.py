"""Loading the compiled extension deeplab_ops._C, with an error that says how to fix a missing or stale build."""

from __future__ import annotations

import functools
import importlib

import torch

_REBUILD = (
    "Build it against the torch in this environment with `pip install --no-build-isolation -e .` "
    "from the repository root (torch must be installed first: `pip install -r requirements.txt`)."
)


def load() -> None:
    """Import deeplab_ops._C, which registers every op schema and the C++ kernels."""
    try:
        importlib.import_module("deeplab_ops._C")
    except ModuleNotFoundError as e:
        if e.name != "deeplab_ops._C":
            raise
        raise ImportError(f"deeplab_ops: the compiled extension deeplab_ops._C is missing. {_REBUILD}") from e
    except (ImportError, OSError) as e:
        raise ImportError(
            f"deeplab_ops: the compiled extension deeplab_ops._C cannot be loaded with torch {torch.__version__} "
            f"({e}). It was probably built against another torch. {_REBUILD}"
        ) from e


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether deeplab_ops::<op> has a kernel registered for a dispatch key ("CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"deeplab_ops::{op}", dispatch_key)


@functools.cache
def cuda_kernels_compiled() -> bool:
    """Whether this build of _C contains the CUDA C++ kernels."""
    return has_kernel("bn_apply", "CUDA")

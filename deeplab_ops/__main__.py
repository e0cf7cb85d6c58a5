"""`python -m deeplab_ops`: versions, compiled and usable backends, the GPU, and what `auto` picks."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main() -> int:
    import torch

    print(f"python       {platform.python_version()} ({sys.executable})")
    print(f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"triton       {_version('triton')}")
    try:
        import deeplab_ops
        from deeplab_ops import _extension, backends
    except ImportError as e:
        print(f"deeplab_ops  cannot be imported: {e}")
        return 1
    print(f"deeplab_ops  {deeplab_ops.__version__} ({os.path.dirname(deeplab_ops.__file__)})")
    cuda_built = _extension.cuda_kernels_compiled()
    print(f"compiled     C++ CPU kernels: yes; CUDA C++ kernels: {'yes' if cuda_built else 'no'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"gpu {i}        {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        print("gpu          none visible")
    interp = backends.interpreter_active()
    forced = os.environ.get(backends.ENV_VAR, "unset")
    print(f"TRITON_INTERPRET={'1' if interp else 'unset'}; {backends.ENV_VAR}={forced}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        print(f"backends on {dev}:")
        for name, reasons in deeplab_ops.available_backends(dev).items():
            if name == "triton" and not reasons:
                reasons = backends.not_supported_reasons("triton", "conv_bn_relu", torch.device(dev), **_probe(dev))
            print(f"  {name:<10} {'usable' if not reasons else 'unusable: ' + '; '.join(reasons)}")
    print(f"auto picks   CPU tensors: {deeplab_ops.auto_backend('cpu')}; CUDA tensors: {_auto_cuda()}")
    return 0


def _probe(dev: str) -> dict:
    """A typical call (3x3, 64 channels, fp32) used to ask per-op support questions."""
    import torch

    x = torch.empty((2, 64, 33, 33), device="meta")
    w = torch.empty((64, 64, 3, 3), device="meta")
    return {"x": x, "weight": w, "stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "training": True,
            "residual": None}


def _auto_cuda() -> str:
    """What auto picks for CUDA tensors: answered from the build even without a GPU."""
    import torch

    from deeplab_ops import backends

    if os.environ.get(backends.ENV_VAR) not in (None, "", "auto"):
        return os.environ[backends.ENV_VAR]
    cuda = torch.device("cuda")
    for name in backends.auto_candidates(cuda):
        reasons = [r for r in backends.not_supported_reasons(name, "conv_bn_relu", cuda, **_probe("cuda"))
                   if "runs CUDA tensors" not in r]
        if not reasons:
            return name + ("" if torch.cuda.is_available() else " (no GPU visible here)")
    return "none (no CUDA backend is usable in this build)"


if __name__ == "__main__":
    sys.exit(main())

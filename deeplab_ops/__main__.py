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


def _parse(argv: list[str] | None) -> None:
    import argparse

    argparse.ArgumentParser(
        prog="python -m deeplab_ops",
        description="Report the Python, torch and triton versions, the compiled kernels, the GPUs, which backends "
                    "run here (and why the others cannot), and what backend=None picks for CPU and CUDA tensors. "
                    "Exits 1 when an environment setting would make op calls fail.",
        epilog=f"Settings read: {_SETTINGS}.",
    ).parse_args(argv)  # no options: --help prints this, anything else exits 2


_SETTINGS = "DEEPLAB_OPS_BACKEND (the backend of backend=None), DEEPLAB_OPS_CPU_WINOGRAD (0: no Winograd), " \
            "DEEPLAB_OPS_AUTOTUNE (gpu, all or off: how triton kernels are tuned), " \
            "DEEPLAB_OPS_TUNING_CACHE (a folder, or off: where tuned triton configurations are kept), " \
            "TRITON_INTERPRET (1: triton runs CPU tensors)"


def _winograd_setting() -> str | None:
    """The error every cpu-backend inference call would raise for $DEEPLAB_OPS_CPU_WINOGRAD (None: a valid one)."""
    value = os.environ.get("DEEPLAB_OPS_CPU_WINOGRAD")
    if value in (None, "", "0", "1"):
        return None
    return (f"DEEPLAB_OPS_CPU_WINOGRAD={value!r} is not a setting; expected '0' (Winograd off) or '1' (on, the "
            f"default)")


def _build_lines(cuda_built: bool, info: dict | None) -> list[str]:
    """What was compiled and, from setup.py's record of the build, against which torch and why no CUDA kernels."""
    line = f"compiled     C++ CPU kernels: yes; CUDA C++ kernels: {'yes' if cuda_built else 'no'}"
    if not cuda_built and info and info.get("cuda_reason"):
        line += f" ({info['cuda_reason']})"
    lines = [line]
    if info:
        extra = []
        if cuda_built and info.get("cuda_home"):
            extra.append(f"CUDA toolkit {info['cuda_home']}")
        if cuda_built and info.get("cuda_arch_list"):
            extra.append(f"TORCH_CUDA_ARCH_LIST={info['cuda_arch_list']}")
        if info.get("debug"):
            extra.append("DEBUG=1 (-O0 -g)")
        lines.append(f"built with   torch {info.get('torch', '?')}" + "".join(f"; {e}" for e in extra))
    else:
        lines.append("built with   unknown (no _build_info.json beside deeplab_ops._C: built by an older setup.py)")
    return lines


def main(argv: list[str] | None = None) -> int:
    _parse(argv)
    import torch

    print(f"python       {platform.python_version()} ({sys.executable})")
    print(f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"triton       {_version('triton')}")
    try:
        import deeplab_ops
        from deeplab_ops import _extension, backends
        from deeplab_ops.common import TUNING_CACHE_ENV, env_autotune_mode, tuning_cache_folder
    except ImportError as e:
        print(f"deeplab_ops  cannot be imported: {e}")
        return 1
    if _extension.LOAD_ERROR is not None:  # the package imported only to report this
        print(f"deeplab_ops  cannot be imported: {_extension.LOAD_ERROR}")
        info = _extension.build_info()
        if info:
            print(f"built with   torch {info.get('torch', '?')} (deeplab_ops/{_extension.BUILD_INFO})")
        return 1
    print(f"deeplab_ops  {deeplab_ops.__version__} ({os.path.dirname(deeplab_ops.__file__)})")
    cuda_built = _extension.cuda_kernels_compiled()
    for line in _build_lines(cuda_built, _extension.build_info()):
        print(line)
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"gpu {i}        {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        print("gpu          none visible")
    interp = backends.interpreter_active()
    forced = os.environ.get(backends.ENV_VAR)
    interp_value = os.environ.get("TRITON_INTERPRET")
    print(f"TRITON_INTERPRET={'unset' if interp_value is None else repr(interp_value)} (the interpreter is "
          f"{'on' if interp else 'off'}); {backends.ENV_VAR}={'unset' if forced is None else forced}")
    try:
        backends.env_backend()
    except ValueError as e:
        print(f"error        {e}: every op call with backend=None raises this")
        return 1
    winograd = _winograd_setting()
    if winograd is not None:
        print(f"error        {winograd}: every cpu-backend inference call raises this")
        return 1
    value = os.environ.get("DEEPLAB_OPS_CPU_WINOGRAD") or "unset"  # (valid here: "", "0", "1" or unset)
    print(f"cpu winograd {'off' if value == '0' else 'on'} (DEEPLAB_OPS_CPU_WINOGRAD={value})")
    try:
        tuning = env_autotune_mode()
    except ValueError as e:
        print(f"error        {e}: every triton-backend call raises this")
        return 1
    kept = tuning_cache_folder(os.environ.get(TUNING_CACHE_ENV, ""))
    print(f"triton tuning {tuning}; winners kept "
          + (f"in {kept}" if kept else "nowhere") + f" ({TUNING_CACHE_ENV})")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        print(f"backends on {dev}:")
        for name, reasons in deeplab_ops.available_backends(dev).items():
            if name == "triton" and not reasons:
                reasons = backends.not_supported_reasons("triton", "conv_bn_relu", torch.device(dev), **_probe())
            print(f"  {name:<10} {'usable' if not reasons else 'unusable: ' + '; '.join(reasons)}")
    print(f"auto picks   CPU tensors: {_auto_cpu()}; CUDA tensors: {_auto_cuda()}")
    forced = backends.env_backend()
    if forced is not None and _forced_refusal("cpu") and (not torch.cuda.is_available() or _forced_refusal("cuda")):
        where = "CPU tensors or the GPUs" if torch.cuda.is_available() else "CPU tensors, and no GPU is visible"
        print(f"error        {backends.ENV_VAR}={forced!r} runs no tensor here (not {where}): every op call with "
              "backend=None raises")
        return 1
    return 0


def _probe() -> dict:
    """A typical call (3x3, 64 channels, fp32) used to ask per-op support questions."""
    import torch

    x = torch.empty((2, 64, 33, 33), device="meta")
    w = torch.empty((64, 64, 3, 3), device="meta")
    return {"x": x, "weight": w, "stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "training": True,
            "residual": None}


def _forced_refusal(device) -> str | None:
    """Why the backend $DEEPLAB_OPS_BACKEND forces cannot run tensors on `device` (None: it can, or none is forced);
    without a GPU, CUDA tensors are judged from the build alone."""
    import torch

    from deeplab_ops import backends

    forced = backends.env_backend()
    if forced is None:
        return None
    device = torch.device(device)
    reasons = backends.not_supported_reasons(forced, "conv_bn_relu", device, **_probe())
    if device.type == "cuda" and not torch.cuda.is_available():
        reasons = _build_reasons(reasons)
    if not reasons:
        return None
    return f"none ({backends.ENV_VAR}={forced!r} cannot run them: {'; '.join(reasons)})"


def _build_reasons(reasons: list[str]) -> list[str]:
    """Of why a backend cannot run a CUDA call here, the reasons of this build (not: no GPU is visible now)."""
    from deeplab_ops import backends

    return [r for r in reasons if r != backends.NO_CUDA_DEVICE and "runs CUDA tensors" not in r]


def _auto_cpu() -> str:
    """What backend=None runs CPU tensors with, or why nothing."""
    from deeplab_ops import backends

    refusal = _forced_refusal("cpu")
    if refusal:
        return refusal
    return backends.auto_backend("cpu") or "none"


def _auto_cuda() -> str:
    """What auto picks for CUDA tensors: answered from the build even without a GPU."""
    import torch

    from deeplab_ops import backends

    refusal = _forced_refusal("cuda")
    if refusal:
        return refusal
    suffix = "" if torch.cuda.is_available() else " (no GPU visible here)"
    forced = backends.env_backend()
    if forced is not None:
        return forced + suffix
    cuda = torch.device("cuda")
    for name in backends.auto_candidates(cuda):
        reasons = _build_reasons(backends.not_supported_reasons(name, "conv_bn_relu", cuda, **_probe()))
        if not reasons:
            return name + suffix
    return "none (no CUDA backend is usable in this build)"


def _run() -> int:
    try:
        return main()
    except BrokenPipeError:  # the reader stopped early (`python -m deeplab_ops | head -1`): no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush of stdout would fail again
        return 1


if __name__ == "__main__":
    sys.exit(_run())

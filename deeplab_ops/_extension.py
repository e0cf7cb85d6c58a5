"""Loading the compiled extension deeplab_ops._C, with an error that says how to fix a missing or stale build."""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import itertools
import json
import os
import sys

import torch

REBUILD = (
    "Build it against the torch in this environment with `pip install --no-build-isolation -e .` "
    "from the repository root, or `pip install --no-build-isolation .` for a regular install (torch must be "
    "installed first: `pip install -r requirements.txt`)."
)


# Written by setup.py beside _C: the torch it was built against, whether the CUDA kernels were compiled and why not.
BUILD_INFO = "_build_info.json"
_HERE = os.path.dirname(os.path.abspath(__file__))


def build_info(directory: str = _HERE) -> dict | None:
    """What setup.py recorded about the build of _C in `directory` (None: no record, e.g. an older build)."""
    try:
        with open(os.path.join(directory, BUILD_INFO)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


@functools.cache
def cuda_build_reason() -> str | None:
    """Why this package's _C has no CUDA kernels, as setup.py recorded it (None: no record, or it has them)."""
    return (build_info() or {}).get("cuda_reason")


def _extension_present(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, "_C" + suffix))
               for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def stale_build_message(info: dict | None, torch_version: str = torch.__version__) -> str | None:
    """Why _C must not be loaded with this torch (None: it may). An extension built against another torch can load
    without an error and then crash or compute garbage: its C++ calls assume that torch's data layouts."""
    built = (info or {}).get("torch")
    if not built or built == torch_version:
        return None
    return (f"deeplab_ops: the compiled extension deeplab_ops._C was built against torch {built}, but this is torch "
            f"{torch_version}: it must be rebuilt. {REBUILD}")


def installed_elsewhere(directory: str = _HERE) -> str | None:
    """The folder of an installed deeplab_ops other than the one in `directory` (None: there is none, or it is this
    one). After a regular `pip install .`, Python started in the repository (or `python train.py` there, whose folder
    is sys.path[0]) imports the source tree's deeplab_ops, which has no _C of its own, instead of the installed one."""
    import importlib.metadata  # here: only a failed import needs it

    try:
        here = os.path.realpath(os.path.join(directory, "__init__.py"))
        for dist in importlib.metadata.distributions(name="deeplab_ops"):
            for file in dist.files or ():
                if file.as_posix() == "deeplab_ops/__init__.py":
                    path = os.path.realpath(str(dist.locate_file(file)))
                    if path != here and os.path.isfile(path):
                        return os.path.dirname(path)
    except Exception:  # a damaged install record must not hide the real error
        return None
    return None


def missing_message(directory: str = _HERE) -> str:
    """Why _C cannot be imported when there is none beside this package, and what to do."""
    other = installed_elsewhere(directory)
    if other is None:
        return f"deeplab_ops: the compiled extension deeplab_ops._C is missing. {REBUILD}"
    return (f"deeplab_ops: the compiled extension deeplab_ops._C is missing from {directory}, a source tree that "
            f"comes before the installed deeplab_ops ({other}) on sys.path because it is in the current folder or the "
            f"folder of the script being run. Run Python from another folder (train.py as `python -m train`), or "
            f"build the extension into the source tree too: `pip install --no-build-isolation -e .` there.")


def load(directory: str = _HERE) -> None:
    """Import deeplab_ops._C, which registers every op schema and the C++ kernels."""
    info = build_info(directory)
    if _extension_present(directory):
        stale = stale_build_message(info)
        if stale:
            raise ImportError(stale)
    try:
        importlib.import_module("deeplab_ops._C")
    except ModuleNotFoundError as e:
        if e.name != "deeplab_ops._C":
            raise
        raise ImportError(missing_message(directory)) from e
    except (ImportError, OSError) as e:
        if info and info.get("torch") == torch.__version__:
            why = f"It was built against this torch ({torch.__version__}); rebuilding may still help."
        else:
            why = "It was probably built against another torch."
        raise ImportError(
            f"deeplab_ops: the compiled extension deeplab_ops._C cannot be loaded with torch {torch.__version__} "
            f"({e}). {why} {REBUILD}"
        ) from e


# Why _C did not load, when `python -m deeplab_ops` imported the package to report it (diagnosing()); else None.
LOAD_ERROR: ImportError | None = None


def diagnosing(argv: list[str] | None = None) -> bool:
    """Whether this process is `python -m deeplab_ops`, the report of what was built: its import of the package must
    not fail on a missing or stale _C (runpy imports the package before __main__ runs), so that it can say why."""
    argv = list(getattr(sys, "orig_argv", []) if argv is None else argv)
    return "-mdeeplab_ops" in argv or ("-m", "deeplab_ops") in itertools.pairwise(argv)


def load_for_package() -> bool:
    """load(), from deeplab_ops/__init__.py: True when _C is loaded; False (the failure kept in LOAD_ERROR) only under
    `python -m deeplab_ops`, which then reports it; any other import raises the ImportError."""
    global LOAD_ERROR
    try:
        load()
    except ImportError as e:
        if not diagnosing():
            raise
        LOAD_ERROR = e
        return False
    return True


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether deeplab_ops::<op> has a kernel registered for a dispatch key ("CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"deeplab_ops::{op}", dispatch_key)


@functools.cache
def cuda_kernels_compiled() -> bool:
    """Whether this build of _C contains the CUDA C++ kernels."""
    return has_kernel("bn_apply", "CUDA")

"""Build deeplab_ops._C: the C++ CPU kernels always, the CUDA kernels whenever they can be compiled.

Build switches (environment variables):

  DEEPLAB_OPS_CUDA       unset: build the CUDA sources when a CUDA toolkit is found and torch is a CUDA
                         build; "0": never build them; "1": build them or fail with the reason.
  CUDA_HOME / CUDA_PATH  the CUDA toolkit to use. Unset: found from `nvcc` on PATH, following symbolic
                         links and wrapper scripts to the real toolkit folder, then /usr/local/cuda.
  TORCH_CUDA_ARCH_LIST   GPU architectures, e.g. "9.0" or "8.0;9.0+PTX". Unset: the visible GPUs', or
                         "8.0;9.0+PTX" when no GPU is visible (compiling needs no GPU).
  MAX_JOBS               parallel compile jobs (ninja). Unset: the CPU count, capped so that each job
                         has about 4 GiB of memory.
  DEBUG=1                -O0 -g host and device code (device code with -G is not enabled: too slow).

Install with `pip install --no-build-isolation -e .` after installing torch: the extension must be
compiled against the torch that will import it, which an isolated build environment would not have.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

try:
    import torch  # noqa: F401
except ImportError:
    sys.exit(
        "deeplab_ops: torch is not installed in this environment. Install torch first "
        "(pip install -r requirements.txt), then build with: pip install --no-build-isolation -e ."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> str | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        sys.exit(f"deeplab_ops: {name}={value!r} is not understood; expected 0 or 1 (or unset).")
    return value


def _is_toolkit(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")) and (
        os.path.isfile(os.path.join(path, "bin", "nvcc"))
    )


def find_cuda_home() -> tuple[str | None, str]:
    """Return (toolkit folder or None, how it was found or why not).

    torch guesses CUDA_HOME as the folder above `which nvcc`; where nvcc is a link or a wrapper script
    (e.g. /usr/local/bin/nvcc -> the toolkit), that guess is /usr/local and linking -lcudart fails.
    So follow the link, and failing that ask nvcc itself where its toolkit is (`--dryrun` prints TOP).
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path:
            if _is_toolkit(path):
                return path, f"{var}={path}"
            return None, f"{var}={path} is not a CUDA toolkit (no bin/nvcc and include/cuda_runtime.h)"
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(real):
            return real, f"nvcc on PATH ({nvcc} -> {real})"
        try:
            dry = subprocess.run(
                [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull],
                capture_output=True, text=True, timeout=60,
            )
            match = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
            if match:
                top = os.path.realpath(match.group(1).strip())
                if _is_toolkit(top):
                    return top, f"nvcc on PATH ({nvcc}, toolkit {top})"
        except (OSError, subprocess.SubprocessError):
            pass
    for path in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if _is_toolkit(path):
            return os.path.realpath(path), f"default location {path}"
    return None, "no nvcc on PATH, no CUDA_HOME, no /usr/local/cuda"


def cuda_decision() -> tuple[bool, str | None]:
    """Decide whether to build the CUDA sources; export CUDA_HOME for torch when we do."""
    mode = _env_flag("DEEPLAB_OPS_CUDA")
    if mode == "0":
        print("deeplab_ops: DEEPLAB_OPS_CUDA=0, building the CPU kernels only")
        return False, None
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    home, how = find_cuda_home()
    if home is None:
        reasons.append(f"no CUDA toolkit found: {how}")
    if reasons:
        if mode == "1":
            sys.exit("deeplab_ops: DEEPLAB_OPS_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))
        print("deeplab_ops: building the CPU kernels only: " + "; ".join(reasons))
        return False, None
    os.environ["CUDA_HOME"] = home
    print(f"deeplab_ops: building the CUDA kernels with the toolkit at {home} ({how})")
    return True, home


def default_max_jobs() -> None:
    if os.environ.get("MAX_JOBS"):
        return
    jobs = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        jobs = max(1, min(jobs, int(mem_gib // 4)))
    except (ValueError, OSError, AttributeError):
        pass
    os.environ["MAX_JOBS"] = str(jobs)


def extensions():
    with_cuda, _ = cuda_decision()
    # Imported only now: torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    default_max_jobs()
    debug = os.environ.get("DEBUG", "0") == "1"
    # No -std flag: torch adds the standard its headers need (C++17 or C++20, by version).
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags = [*opt, "-fdiagnostics-color=always"]
    # No contraction into fused multiply-adds: the baseline, AVX2 and AVX-512 builds of a CPU kernel
    # (csrc/cpu/isa_dispatch.h) round alike. No trapping math: selects on floats vectorize (nothing here reads FP
    # exception flags).
    if not sys.platform.startswith("win"):
        cxx_flags += ["-ffp-contract=off", "-fno-trapping-math"]
    # OpenMP: ATen's at::parallel_for is a header template that runs its body serially unless the including code is
    # compiled with OpenMP (_OPENMP), so without -fopenmp every CPU kernel here would use one thread whatever
    # torch.get_num_threads() says. torch on Linux runs on libgomp (its own copy, soname libgomp.so.1); the
    # extension links the same soname, which the loader resolves to the copy torch already loaded: one thread pool,
    # sized by torch.set_num_threads.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags += openmp
    link_flags = list(openmp)
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/composite/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []  # py_limited_api=True: torch's BuildExtension defines Py_LIMITED_API itself
    if not with_cuda:
        return [
            CppExtension(
                "deeplab_ops._C", sources, include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags, define_macros=define_macros,
                py_limited_api=True,
            )
        ]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    nvcc_flags = [
        *opt, "--expt-relaxed-constexpr", "-lineinfo",
        # Exactness first: no --use_fast_math (it flushes denormals and approximates rsqrt/div).
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    return [
        CUDAExtension(
            "deeplab_ops._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags,
            # DEEPLAB_OPS_WITH_CUDA: the device-generic composites (csrc/composite/) also register for CUDA.
            define_macros=[*define_macros, ("DEEPLAB_OPS_WITH_CUDA", "1")],
            py_limited_api=True,
        )
    ]


def main() -> None:
    ext_modules = extensions()  # first: it exports CUDA_HOME before torch.utils.cpp_extension is imported
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        options={"bdist_wheel": {"py_limited_api": "cp39"}},
    )


if __name__ == "__main__":
    main()

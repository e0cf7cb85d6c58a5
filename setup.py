"""Build deeplab_ops._C: the C++ CPU kernels always, the CUDA kernels whenever they can be compiled.

Build switches (environment variables):

  DEEPLAB_OPS_CUDA       unset: build the CUDA sources when torch is a CUDA build and a CUDA toolkit of
                         the same major version is found; "0": never build them; "1": build them or fail
                         with the reason.
  CUDA_HOME / CUDA_PATH  the CUDA toolkit to use. Unset: found from `nvcc` on PATH, following symbolic
                         links and wrapper scripts to the real toolkit folder, then /usr/local/cuda. Set to
                         a folder that is not a toolkit (no bin/nvcc, include/cuda_runtime.h) with a CUDA
                         build of torch: an error, unless DEEPLAB_OPS_CUDA=0.
  TORCH_CUDA_ARCH_LIST   GPU architectures, e.g. "9.0" or "8.0;9.0+PTX". Unset: the visible GPUs', or
                         "8.0;9.0+PTX" when no GPU is visible (compiling needs no GPU). Checked against
                         torch's list and `nvcc --list-gpu-arch` before compiling; "native" needs a GPU.
  MAX_JOBS               parallel compile jobs (ninja), a whole number >= 1. Unset: the CPU count, capped
                         so that each job has about 4 GiB of memory.
  DEBUG                  1 (or true/yes/on): -O0 -g host and device code with asserts on (NDEBUG, which
                         Python's compile flags define, undefined; device code with -G is not enabled: too
                         slow); 0 (false/no/off) or unset: -O3. Any other value is an error.

Any value these cannot use stops the build with the reason, before anything is compiled. What was built (the
torch it was built against, whether the CUDA kernels were compiled and why not) is recorded beside the extension
in deeplab_ops/_build_info.json, which `import deeplab_ops` and `python -m deeplab_ops` read.

Install with `pip install --no-build-isolation -e .` after installing torch: the extension must be
compiled against the torch that will import it, which an isolated build environment would not have.
"""

from __future__ import annotations

import glob
import json
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
BUILD_INFO = "_build_info.json"  # beside deeplab_ops/_C*.so; deeplab_ops/_extension.py reads it
_REBUILD = "pip install --no-build-isolation -e ."


_TORCH_VERSION_PROBE = """
import importlib.metadata, importlib.util, os, re
spec = importlib.util.find_spec("torch")
version = ""
if spec is not None and spec.origin:
    try:  # torch.__version__ without importing torch (the dist-info version lacks the local label, e.g. +cu130)
        with open(os.path.join(os.path.dirname(spec.origin), "version.py")) as f:
            version = re.search(r"^__version__\\W*=\\s*\\W([\\w.+-]+)", f.read(), re.M).group(1)
    except (OSError, AttributeError):
        try:
            version = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            version = "(unknown version)"
print(version)
"""


def environment_torch() -> str | None:
    """The torch version this interpreter imports outside any build environment (None: no torch there).

    `-E` drops PYTHONPATH, through which pip's isolated build environment hides the user's site-packages."""
    try:
        out = subprocess.run([sys.executable, "-E", "-c", _TORCH_VERSION_PROBE], capture_output=True, text=True,
                             timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def isolated_build_problem(torch_file: str, torch_version: str) -> str | None:
    """Why the torch this build compiles against is not the one that will import the extension (None: it is).

    Without --no-build-isolation pip downloads torch (`requires` in pyproject.toml) into a temporary
    pip-build-env-* folder and compiles against that one: a build that only loads if the environment's torch is
    the very same version."""
    if "pip-build-env-" not in os.path.realpath(torch_file):
        return None
    env_torch = environment_torch()
    if env_torch == torch_version:
        return None
    if env_torch:
        have, then = f"this environment has torch {env_torch}", f"Build against it with: {_REBUILD}"
    else:
        have = "this environment has no torch"
        then = f"Install torch first (pip install -r requirements.txt), then build against it with: {_REBUILD}"
    return (
        f"deeplab_ops: pip is building in an isolated environment, against the torch {torch_version} it downloaded "
        f"there, but {have} ({sys.executable}): the extension would not load with it. {then}"
    )


_problem = isolated_build_problem(torch.__file__, torch.__version__)
if _problem:
    sys.exit(_problem)


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


def _nvcc_output(home: str, flag: str) -> str:
    """What the toolkit's nvcc prints for `flag` ("" when it cannot be run)."""
    try:
        return subprocess.run([os.path.join(home, "bin", "nvcc"), flag], capture_output=True, text=True,
                              timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def nvcc_release(home: str) -> str | None:
    """The CUDA release of the toolkit's nvcc ("13.0"), or None when nvcc does not say."""
    match = re.search(r"release (\d+)\.(\d+)", _nvcc_output(home, "--version"))
    return f"{match.group(1)}.{match.group(2)}" if match else None


# What this build is: written beside the extension (BUILD_INFO) after it is built.
BUILD = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_kernels": False, "cuda_reason": None}


def cuda_decision() -> tuple[bool, str | None]:
    """Decide whether to build the CUDA sources; export CUDA_HOME for torch when we do."""
    mode = _env_flag("DEEPLAB_OPS_CUDA")
    if mode == "0":
        print("deeplab_ops: DEEPLAB_OPS_CUDA=0, building the CPU kernels only")
        BUILD.update(cuda_kernels=False, cuda_reason="DEEPLAB_OPS_CUDA=0 at build time")
        return False, None
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    home, how = find_cuda_home()
    if home is None:
        explicit = [v for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
        if explicit and torch.version.cuda is not None:
            # The user named a toolkit: building without CUDA would not be what was asked for.
            sys.exit(f"deeplab_ops: {how}. Point {explicit[0]} at the toolkit folder (the one holding bin/nvcc), "
                     f"unset it to find nvcc on PATH, or set DEEPLAB_OPS_CUDA=0 to build the CPU kernels only.")
        reasons.append(f"no CUDA toolkit found: {how}")
    elif torch.version.cuda is not None:
        release = nvcc_release(home)
        if release is not None and release.split(".")[0] != torch.version.cuda.split(".")[0]:
            reasons.append(f"the toolkit at {home} is CUDA {release} but torch {torch.__version__} was built with "
                           f"CUDA {torch.version.cuda} (the major versions must match)")
    if reasons:
        if mode == "1":
            sys.exit("deeplab_ops: DEEPLAB_OPS_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))
        print("deeplab_ops: building the CPU kernels only: " + "; ".join(reasons))
        BUILD.update(cuda_kernels=False, cuda_reason="; ".join(reasons))
        return False, None
    os.environ["CUDA_HOME"] = home
    print(f"deeplab_ops: building the CUDA kernels with the toolkit at {home} ({how})")
    BUILD.update(cuda_kernels=True, cuda_reason=None, cuda_home=home)
    return True, home


_TRUE, _FALSE = ("1", "true", "yes", "on", "y"), ("0", "false", "no", "off", "n", "")


def debug_build() -> bool:
    value = os.environ.get("DEBUG", "")
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    sys.exit(f"deeplab_ops: DEBUG={value!r} is not understood; expected 1, true, yes, on or y (a -O0 -g "
             "build), or 0, false, no, off, n or empty (or unset), in any case.")


def default_max_jobs() -> None:
    """Check MAX_JOBS, or set it from the CPUs and memory. torch ignores a MAX_JOBS that is not all digits (ninja
    then runs as many jobs as it likes) and passes 0 on as `ninja -j 0`, which means no limit at all."""
    value = os.environ.get("MAX_JOBS")
    if value:
        if not (re.fullmatch(r"[0-9]+", value) and int(value) >= 1):  # not isdigit(): "²" is a digit to it
            sys.exit(f"deeplab_ops: MAX_JOBS={value!r} is not a number of compile jobs; expected a whole number "
                     f">= 1 (or unset: the CPU count, capped at one job per 4 GiB of memory).")
        return
    jobs = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        jobs = max(1, min(jobs, int(mem_gib // 4)))
    except (ValueError, OSError, AttributeError):
        pass
    os.environ["MAX_JOBS"] = str(jobs)


def nvcc_archs(home: str) -> set[str] | None:
    """The virtual architectures the toolkit's nvcc compiles for ({"75", "80", ...}), or None if it does not say."""
    found = set(re.findall(r"compute_(\d+)", _nvcc_output(home, "--list-gpu-arch")))
    return found or None


def check_arch_list(home: str) -> None:
    """Stop with the reason when TORCH_CUDA_ARCH_LIST names an architecture torch or this nvcc cannot compile for
    (torch would fail mid-build: a ValueError, an IndexError for "native" without a GPU, or nvcc's "Unsupported gpu
    architecture")."""
    from torch.utils import cpp_extension

    value = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if value.strip() == "native" and not torch.cuda.is_available():
        sys.exit("deeplab_ops: TORCH_CUDA_ARCH_LIST=native compiles for the visible GPUs, and none is visible here: "
                 "name the architectures instead, e.g. TORCH_CUDA_ARCH_LIST='8.0;9.0+PTX'.")
    try:
        flags = cpp_extension._get_cuda_arch_flags()
    except ValueError as e:
        sys.exit(f"deeplab_ops: TORCH_CUDA_ARCH_LIST={value!r}: {e}. Expected compute capabilities such as "
                 f"'8.0;9.0+PTX' (';' or ' ' between them, +PTX to add portable code for newer GPUs).")
    except (AttributeError, TypeError, IndexError):  # a torch whose private helper differs: let torch report
        return
    supported = nvcc_archs(home)
    if supported is None:
        return
    wanted = sorted({m.group(1) for f in flags for m in [re.search(r"arch=compute_(\d+)", f)] if m}, key=int)
    unsupported = [a for a in wanted if a not in supported]
    if unsupported:
        named = ", ".join(f"{a[:-1]}.{a[-1]}" for a in unsupported)
        can = " ".join(f"{a[:-1]}.{a[-1]}" for a in sorted(supported, key=int))
        sys.exit(f"deeplab_ops: TORCH_CUDA_ARCH_LIST={value or '(default)'!r} asks for {named}, which the nvcc at "
                 f"{home} cannot compile for; it supports: {can}.")


def _csrc_files() -> list[str]:
    """Every file under csrc/ (relative, sorted): listed as the extension's `depends` so that an sdist carries the
    headers and the CUDA sources (setuptools puts only the compiled sources of this build in it otherwise)."""
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)
                  if os.path.isfile(p))


def extensions():
    # The settings first: a value this build cannot use stops it before anything else happens.
    default_max_jobs()
    debug = debug_build()
    with_cuda, home = cuda_decision()
    # Imported only now: torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    BUILD["debug"] = debug
    # No -std flag: torch adds the standard its headers need (C++17 or C++20, by version).
    # -UNDEBUG: Python's own compile flags (sysconfig, which setuptools puts first) define NDEBUG, which would
    # compile out every assert and TORCH_INTERNAL_ASSERT_DEBUG_ONLY of a debug build.
    opt = ["-O0", "-g", "-UNDEBUG"] if debug else ["-O3"]
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
    depends = [f for f in _csrc_files() if f not in sources]
    if not with_cuda:
        return [
            CppExtension(
                "deeplab_ops._C", sources, include_dirs=include_dirs, depends=depends,
                extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags, define_macros=define_macros,
                py_limited_api=True,
            )
        ]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    check_arch_list(home)
    BUILD["cuda_arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPUs'"
    nvcc_flags = [
        *opt, "--expt-relaxed-constexpr", "-lineinfo",
        # Exactness first: no --use_fast_math (it flushes denormals and approximates rsqrt/div).
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    depends = [f for f in depends if f not in sources]
    return [
        CUDAExtension(
            "deeplab_ops._C", sources, include_dirs=include_dirs, depends=depends,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags,
            # DEEPLAB_OPS_WITH_CUDA: the device-generic composites (csrc/composite/) also register for CUDA.
            define_macros=[*define_macros, ("DEEPLAB_OPS_WITH_CUDA", "1")],
            py_limited_api=True,
        )
    ]


def editable_build_temp() -> str:
    """Where `pip install -e .` keeps its objects between installs: build/ in the source tree, one folder per
    Python, torch and CUDA decision (ninja sees no change in a header torch installs with -isystem, so an upgraded
    torch gets a new folder instead of reusing objects compiled against the old one)."""
    torch_tag = re.sub(r"[^\w.+-]", "_", torch.__version__)
    kind = "cuda" if BUILD.get("cuda_kernels") else "cpu"
    return os.path.join(ROOT, "build", f"editable-{sys.implementation.cache_tag}-torch{torch_tag}-{kind}")


def build_ext_class():
    """torch's BuildExtension (ninja) that also writes BUILD beside each extension it builds (in place or not)."""
    from torch.utils.cpp_extension import BuildExtension

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        def finalize_options(self):
            super().finalize_options()
            if getattr(self, "editable_mode", False):
                # setuptools builds an editable install in a new temporary folder each time, so ninja found no
                # objects and compiled every source again; a folder of our own keeps them, and ninja recompiles what
                # changed (a source or header, or the compile command: flags, arch list, CUDA on/off).
                self.build_temp = editable_build_temp()

        def run(self):
            super().run()
            for ext in self.extensions:
                folder = os.path.dirname(self.get_ext_fullpath(ext.name))
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, BUILD_INFO), "w") as f:
                    json.dump(BUILD, f, indent=1, sort_keys=True)
                    f.write("\n")

    return BuildExt


def main() -> None:
    ext_modules = extensions()  # first: it exports CUDA_HOME before torch.utils.cpp_extension is imported

    setup(
        ext_modules=ext_modules,
        cmdclass={"build_ext": build_ext_class()},
        # abi3 from Python 3.10: the stable API torch compiles the extension for (-DPy_LIMITED_API=0x030A0000)
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )


if __name__ == "__main__":
    main()

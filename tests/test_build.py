"""The build and the package surface: toolkit discovery, import, `python -m deeplab_ops`."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

import deeplab_ops
from deeplab_ops import _extension


def _load_setup():
    spec = importlib.util.spec_from_file_location("deeplab_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # main() runs only under __main__
    return module


def _fake_toolkit(root: Path) -> Path:
    kit = root / "cuda-13.0"
    (kit / "bin").mkdir(parents=True)
    (kit / "include").mkdir()
    (kit / "include" / "cuda_runtime.h").write_text("")
    nvcc = kit / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho fake\n")
    nvcc.chmod(0o755)
    return kit


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_toolkit_found_through_a_symbolic_link(tmp_path, clean_env):
    kit = _fake_toolkit(tmp_path)
    bindir = tmp_path / "usr-local-bin"
    bindir.mkdir()
    (bindir / "nvcc").symlink_to(kit / "bin" / "nvcc")
    clean_env.setenv("PATH", f"{bindir}{os.pathsep}/usr/bin:/bin")
    home, how = _load_setup().find_cuda_home()
    assert home == str(kit.resolve()), how


def test_toolkit_found_through_a_wrapper_script(tmp_path, clean_env):
    """nvcc may be a shell script that execs the real one: ask it where its toolkit is (--dryrun's TOP)."""
    kit = _fake_toolkit(tmp_path)
    (kit / "bin" / "nvcc").write_text(f"#!/bin/sh\necho '#$ TOP={kit}/bin/..' 1>&2\n")
    bindir = tmp_path / "wrappers" / "bin"
    bindir.mkdir(parents=True)
    wrapper = bindir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {kit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    clean_env.setenv("PATH", f"{bindir}{os.pathsep}/usr/bin:/bin")
    home, how = _load_setup().find_cuda_home()
    assert home == str(kit.resolve()), how


def test_cuda_home_that_is_not_a_toolkit_is_reported(tmp_path, clean_env):
    clean_env.setenv("CUDA_HOME", str(tmp_path))
    home, how = _load_setup().find_cuda_home()
    assert home is None and "not a CUDA toolkit" in how


def test_import_compiles_nothing_and_registers_every_op():
    for op in ("bn_stats", "bn_finalize", "bn_apply", "bn_backward_reduce", "bn_backward_dy", "conv_bn_relu_forward",
               "conv_bn_relu_backward", "aspp_forward", "aspp_backward", "conv_bias_act"):
        assert _extension.has_kernel(op, "CPU"), op
    assert deeplab_ops.__version__


def test_python_m_deeplab_ops_reports_versions_and_backends():
    env = {k: v for k, v in os.environ.items() if k != "DEEPLAB_OPS_BACKEND"}
    out = subprocess.run([sys.executable, "-m", "deeplab_ops"], capture_output=True, text=True, env=env, timeout=120,
                         check=True).stdout
    for needle in ("torch", "triton", "deeplab_ops", "CUDA C++ kernels", "backends on cpu", "auto picks",
                   "CPU tensors: cpu"):
        assert needle in out, f"{needle!r} missing from:\n{out}"
    # CUDA tensors are judged from the build (a GPU absent now is no reason): triton installed, triton it is.
    if importlib.util.find_spec("triton") is not None:
        assert "CUDA tensors: triton" in out, out


def test_python_m_deeplab_ops_has_help_refuses_unknown_arguments_and_bad_settings():
    # It ignored its arguments (--help printed the report, --frobnicate exited 0) and reported a cpu backend usable
    # under a DEEPLAB_OPS_CPU_WINOGRAD that makes every cpu inference call raise (found by a review).
    env = {k: v for k, v in os.environ.items() if k not in ("DEEPLAB_OPS_BACKEND", "DEEPLAB_OPS_CPU_WINOGRAD")}
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=120)
    help_ = run([sys.executable, "-m", "deeplab_ops", "--help"], env=env)
    assert help_.returncode == 0 and "usage: python -m deeplab_ops" in help_.stdout
    assert "DEEPLAB_OPS_CPU_WINOGRAD" in help_.stdout and "backends on cpu" not in help_.stdout
    bad = run([sys.executable, "-m", "deeplab_ops", "--frobnicate"], env=env)
    assert bad.returncode == 2 and "unrecognized arguments: --frobnicate" in bad.stderr
    winograd = run([sys.executable, "-m", "deeplab_ops"], env={**env, "DEEPLAB_OPS_CPU_WINOGRAD": "2"})
    assert winograd.returncode == 1
    assert "DEEPLAB_OPS_CPU_WINOGRAD='2' is not a setting" in winograd.stdout, winograd.stdout


def test_setup_without_torch_says_what_to_do():
    code = (
        "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version'];"
        f"exec(compile(open({str(ROOT / 'setup.py')!r}).read(), 'setup.py', 'exec'), {{'__name__': '__main__'}})"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "install torch first" in proc.stderr.lower() or "install torch first" in proc.stdout.lower()
    assert "--no-build-isolation" in proc.stderr + proc.stdout


def test_missing_extension_error_says_how_to_rebuild():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'deeplab_ops._C':\n"
        "            raise ModuleNotFoundError(\"No module named 'deeplab_ops._C'\", name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import deeplab_ops\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    assert "the compiled extension deeplab_ops._C is missing" in proc.stderr, proc.stderr[-2000:]
    assert "pip install --no-build-isolation -e ." in proc.stderr


def test_triton_backend_runs_here():
    # triton is a requirement: on a CUDA machine the backend runs CUDA tensors; without a GPU, tests/conftest.py
    # turns on the interpreter, so it must run CPU tensors. The triton tests' "cannot run here" skips are guards
    # for other environments; this keeps them from hiding a broken triton install in CI.
    import torch

    from deeplab_ops import backends

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("DEEPLAB_OPS_TEST_NO_INTERPRETER", "0") not in ("", "0"):
        pytest.skip("DEEPLAB_OPS_TEST_NO_INTERPRETER=1 turned the interpreter off on purpose, and no GPU is visible")
    reasons = backends.available_backends(device)["triton"]
    assert not reasons, f"triton backend cannot run {device.type} tensors here: {reasons}"


# C++20 features with no C++17 meaning. torch 2.13+ builds extensions as C++20, torch 2.11 (the GPU machine's) as
# C++17, so the build here cannot catch them: std::erase_if once broke the torch 2.11 build while every check here
# passed. The authoritative check is a build on that stack (docs/kernels.md, "Tested stacks"); this scan is the one
# every run makes. Each pattern has an example it must find (test_cxx20_patterns_find_their_examples).
CXX20_ONLY = {  # pattern: (what, an example)
    r"\bstd::erase(_if)?\s*\(": ("std::erase / std::erase_if (use erase-remove)", "std::erase_if(v, pred);"),
    r"#\s*include\s*<(span|ranges|concepts|format|bit|numbers|source_location|compare|semaphore|latch|barrier|"
    r"stop_token|syncstream)>": ("a C++20 header", "#include <span>"),
    r"\bstd::(span|ranges|views|bit_cast|popcount|bit_width|bit_ceil|bit_floor|countl_zero|countr_zero|has_single_bit|"
    r"format|midpoint|lerp|ssize|to_address|source_location|remove_cvref(_t)?|is_constant_evaluated|type_identity|"
    r"make_shared_for_overwrite|jthread)\b": ("a C++20 library name", "int n = std::popcount(x);"),
    r"\.(starts_with|ends_with|contains)\s*\(": ("starts_with / ends_with / contains (C++20 members)",
                                                  "if (name.starts_with(\"a\")) {}"),
    r"<=>": ("the three-way comparison operator", "auto c = a <=> b;"),
    r"\b(consteval|constinit|co_await|co_yield|co_return|char8_t|requires|concept)\b":
        ("a C++20 keyword", "consteval int f() { return 1; }"),
    r"\busing\s+enum\b": ("using enum", "using enum Color;"),
    r"\[\[\s*(likely|unlikely|no_unique_address)\s*\]\]": ("a C++20 attribute", "if (x) [[likely]] { }"),
    r"(^|[{,(])\s*\.[A-Za-z_]\w*\s*=(?!=)": ("a designated initializer", "Point p{.x = 1, .y = 2};"),
    r"\[[^\]\n]*\]\s*<\s*(typename|class|auto)\b": ("a lambda with a template parameter list",
                                                         "auto f = []<typename T>(T t) { return t; };"),
}


def _code_only(text: str) -> str:
    """C++ source without comments and string/character literals (their text is not code), lines kept."""
    import re

    def blank(match: re.Match) -> str:
        return "\n" * match.group(0).count("\n") if match.group(0).startswith("/*") else \
            (" " if match.group(0).startswith("//") else '""')

    return re.sub(r'/\*.*?\*/|//[^\n]*|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', blank, text, flags=re.S)


def _cxx20_uses(text: str) -> list[tuple[int, str]]:
    import re

    found = []
    for number, code in enumerate(_code_only(text).splitlines(), 1):
        for pattern, (what, _) in CXX20_ONLY.items():
            if re.search(pattern, code):
                found.append((number, what))
    return found


def test_cxx20_patterns_find_their_examples():
    """Each pattern finds its example, and none fires on C++17 code that merely looks alike (comments, strings,
    a member named like a C++20 one, a `.x = ` assignment statement)."""
    for pattern, (what, example) in CXX20_ONLY.items():
        assert any(w == what for _, w in _cxx20_uses(example)), (pattern, example)
    clean = """
        // requires grad; std::erase_if in a comment; a <=> b
        /* consteval
           std::span */
        TORCH_CHECK(ok, "x requires a tensor that contains(3) <=> values");
        v.erase(std::remove_if(v.begin(), v.end(), pred), v.end());
        p.x = 1;
        q->x = 2;
        auto f = [](int t) { return t < 3; };
        char c = '"';
        std::map<int, int> m; m.count(3);
    """
    assert _cxx20_uses(clean) == [], _cxx20_uses(clean)


def test_cxx_sources_are_cxx17():
    """Every C++ and CUDA source compiles as C++17 (torch < 2.13 builds extensions with -std=c++17)."""
    found = []
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix in (".cpp", ".h", ".cu", ".cuh"):
            lines = path.read_text().splitlines()
            found += [f"{path.relative_to(ROOT)}:{n}: {what}: {lines[n - 1].strip()}"
                      for n, what in _cxx20_uses(path.read_text())]
    assert not found, "C++20 in the sources:\n" + "\n".join(found)
